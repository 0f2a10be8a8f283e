#!/usr/bin/env bash
# The prepared GPU check for a session with a lent H200 (the device tool). Under 8 minutes; installs nothing from the
# network; builds its random-initialised models itself; writes what it measured to the folder given (default
# bench/results). Keep its results in bench/results/ when it has been run.
#
# The device image's transformers may be older than the 5.24 this project is tested with. Once, here (where pip
# reaches PyPI), fetch the pure-Python wheel into .whl/ and carry it:
#   echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps -d .whl transformers==5.24.0
# then:  run(command="bash bench/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
#
# 1. tests/test_gpu.py: CUDA-graph decoding equals eager generate; no cudagraph skips or recompiles over two prompts;
#    bf16 decoding stays within capacity.
# 2. The paper's table in miniature on the DeepSeek-R1-Distill-Llama-8B shape (bf16, random weights): full cache
#    (transformers eager) against rkv_flex compiled, at batch 1 and at the largest batch that fits a KV cap.
set -uo pipefail
OUT="${1:-bench/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())" 2>&1 | tee "$OUT/gpu-env.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout 320 python3 bench/throughput.py --device cuda --shape r1-llama-8b --dtype bfloat16 \
  --methods stock-eager,rkv-compiled --parts AD --new-tokens 2048 --lengths 1024 --budget 512 --buffer 128 \
  --cap-gib 40 --cap-length 4096 --max-batch 256 --out gpu-r1-llama-8b 2>&1 | grep -v "tok/s\]" | tail -40
cp bench/results/gpu-r1-llama-8b.* "$OUT"/ 2>/dev/null || true
