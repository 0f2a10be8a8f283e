#!/usr/bin/env bash
# The prepared GPU check, for a session with a lent H200 (the device tool). bench/gpu_check.py lists its parts; each
# writes its JSON to the folder given as soon as it ends. The device image has torch 2.11 and transformers 5.17; the
# check needs transformers 5.24 and attn-gym, carried as wheels (with regex, which 5.24 needs newer). Once, here
# (pip reaches PyPI), in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 regex==2026.11.19 attn-gym==0.0.17
# then, one call of about six minutes (the parts' limits add up to 12.5; a healthy run takes about half):
#   run(command="bash bench/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
# and, if device time is left, a second for serving under a KV cap (about five minutes; its limit is eight):
#   run(command="bash bench/gpu_check.sh $OUT env,serving", carry=[".whl"], timeout_s=600)
# and commit what comes back into bench/results/ (gpu-*.json, gpu-check.log). Rehearse here first:
#   python bench/gpu_check.py --device cpu --dry-run --out /tmp/gpu-dry
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUT [PARTS]}"  # PARTS: gpu_check.py's default unless given
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee "$OUT/gpu-check.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu-check.log"
python3 bench/gpu_check.py --out "$OUT" ${2:+--parts "$2"} 2>&1 | tee -a "$OUT/gpu-check.log"
