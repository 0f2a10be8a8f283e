"""The GPU check: what a lent GPU must confirm, in one run that cannot lose its results.

Each part runs in its own process with its own time limit and writes ``<out>/gpu-<part>.json`` when it ends; the
parent adds a line per part to ``<out>/gpu-summary.json`` at once, so a part that fails or hangs costs only itself.

  env         versions; aborts the whole check unless the carried transformers 5.24 is the one imported
  tests       tests/test_gpu.py: CUDA-graph decoding against the dense reference (fp32 tokens, bf16 logits) through
              compactions, one recording per graph and one replay per call, GQA 7, a capacity off the block size
  fold        flex decoding of R1-Distill-Qwen-7B's heads (28 query, 4 KV: GQA 7, no flex decoding kernel) with the
              query group folded into the query length, or not: time per call at batch 64 and 2176 slots
  scoring     one layer's compaction (R-KV scores and selection) at batch 64 and 2176 slots of the
              R1-Distill-Llama-8B layer shape: time and peak memory
  throughput  bench/throughput.py in miniature on R1-Distill-Llama-8B's shape (bf16, --layers layers)
  serving     bench/serving.py on the same shape: 64 random prompts with outputs of 64-2048 tokens under a 1 GiB KV
              cap, stock static batches, transformers' continuous batching and the engine (not in the default
              parts: it is a second device call, see bench/gpu_check.sh)

On a CUDA device, inductor's ``triton.cudagraph_or_error`` is set: a CUDA graph that would be skipped fails loudly.

    python bench/gpu_check.py --out DIR                                  # on the GPU (see bench/gpu_check.sh)
    python bench/gpu_check.py --device cpu --dry-run --out /tmp/dry      # every part on tiny shapes, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
REQUIRED_TRANSFORMERS = "5.24.0"
PARTS = {"env": 60, "tests": 240, "fold": 90, "scoring": 90, "throughput": 300, "serving": 480}  # seconds each
DEFAULT_PARTS = "env,tests,fold,scoring,throughput"  # one device call; "env,serving" is the second


def write(out: Path, name: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{name}.json").write_text(json.dumps(payload, indent=1))


def strict(device: str) -> None:
    import torch._inductor.config

    if device == "cuda":
        torch._inductor.config.triton.cudagraph_or_error = True


def part_env(args) -> dict:
    import torch
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["ok"] = transformers.__version__ == REQUIRED_TRANSFORMERS
    return info


def part_tests(args) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-rA"]
    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
    log = done.stdout + done.stderr
    summary = [line for line in log.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    return {"returncode": done.returncode, "results": summary, "log_tail": log[-6000:]}


def _timed(function, *inputs, repeats: int, device: str) -> float:
    import torch

    for _ in range(3):
        function(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def folded_flex_step(query, key, value, valid, pos, query_pos, scale):
    """Flex decoding with the query group folded into the query length ([B, Hkv, G, D]): each KV head is read once
    for its whole group, which keeps flex's decoding kernel for any group size. Not in the library: torch 2.13's CPU
    kernel is wrong for it at batch 1 past 256 slots, so it waits for this check to show it right and faster."""
    from torch.nn.attention.flex_attention import flex_attention

    from rkv_flex.masks import block_tables, slot_block_mask, slot_mask_mod

    batch, query_heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = query_heads // kv_heads
    mask_mod = slot_mask_mod(valid, pos, query_pos, 1, None, rows_per_query=group)
    block_mask = slot_block_mask(block_tables(batch, group, slots, query.device), mask_mod, group, slots)
    folded = query.view(batch, kv_heads, group, dim)
    return flex_attention(folded, key, value, block_mask=block_mask, scale=scale).view(batch, query_heads, 1, -1)


def part_fold(args) -> dict:
    import torch

    from rkv_flex.kernels import flex_span, masked_sdpa

    batch, query_heads, kv_heads, dim, slots = (64, 28, 4, 128, 2176) if not args.dry_run else (2, 7, 1, 16, 200)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, query_heads, 1, dim, generator=generator).to(args.device, dtype)
    keys = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(args.device, dtype)
    values = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(args.device, dtype)
    valid = (torch.rand(batch, kv_heads, slots, generator=generator) > 0.2).to(args.device)
    pos = torch.arange(slots).expand(batch, kv_heads, slots).contiguous().to(args.device)
    query_pos = torch.full((batch, 1), slots, device=args.device)
    reference = masked_sdpa(query.float(), keys.float(), values.float(), valid, pos, query_pos, dim**-0.5)
    result = {"shape": dict(batch=batch, query_heads=query_heads, kv_heads=kv_heads, dim=dim, slots=slots)}
    for fold in (False, True):
        step = torch.compile(
            lambda q, k, v, vd, p, qp, fold=fold: (
                folded_flex_step(q, k, v, vd, p, qp, dim**-0.5)
                if fold
                else flex_span(q, k, v, vd, p, qp, dim**-0.5, None)
            ),
            fullgraph=True,
            dynamic=False,
        )
        out = step(query, keys, values, valid, pos, query_pos)
        error = float((out.float() - reference).abs().max())
        ms = _timed(step, query, keys, values, valid, pos, query_pos, repeats=50, device=args.device)
        result["folded" if fold else "grouped"] = {"ms": ms, "max_error_vs_sdpa": error}
    result["faster"] = min(("grouped", "folded"), key=lambda name: result[name]["ms"])
    return result


def part_scoring(args) -> dict:
    import torch

    from rkv_flex.policies import RKV, SlotState
    from rkv_flex.scoring import select_keep

    batch, query_heads, kv_heads, dim, slots = (64, 32, 8, 128, 2176) if not args.dry_run else (2, 8, 2, 16, 200)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(args.device, dtype)

    window = torch.zeros(batch, 1, slots, dtype=torch.bool, device=args.device)
    window[..., -8:] = True
    state = SlotState(
        keys=tensor(batch, kv_heads, slots, dim),
        values=tensor(batch, kv_heads, slots, dim),
        valid=torch.ones(batch, kv_heads, slots, dtype=torch.bool, device=args.device),
        pos=torch.arange(slots, device=args.device).expand(batch, kv_heads, slots),
        window=window,
        queries=tensor(batch, query_heads, 8, dim),
        query_valid=torch.ones(batch, 8, dtype=torch.bool, device=args.device),
        scaling=dim**-0.5,
    )
    policy = RKV()
    select = torch.compile(lambda s: select_keep(policy(s), s.valid, s.window, slots - 128), fullgraph=True)
    select(state)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    ms = _timed(select, state, repeats=5, device=args.device)
    result = {"shape": dict(batch=batch, kv_heads=kv_heads, dim=dim, slots=slots), "ms_per_layer": ms}
    if args.device == "cuda":
        result["peak_temporary_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    return result


def part_throughput(args) -> dict:
    shape = ["--shape", "tiny"] if args.dry_run else ["--shape", "r1-llama-8b", "--layers", str(args.layers)]
    return run_benchmark(
        "throughput.py",
        "--device",
        args.device,
        *shape,
        "--dtype",
        "bfloat16" if args.device == "cuda" else "float32",
        "--contexts",
        *(["640", "2048"] if args.dry_run else ["1024", "4096", "8192"]),
        "--parts",
        "AD",
        "--paths",
        "stock-eager,rkv-compiled",
        "--cap-gib",
        "0.05" if args.dry_run else "40",
        "--cap-length",
        "1024" if args.dry_run else "4096",
        "--max-batch",
        "16" if args.dry_run else "256",
    )


def part_serving(args) -> dict:
    if args.dry_run:
        shape = ["--shape", "tiny", "--prompts", "6", "--min-new", "8", "--max-new", "24", "--budget", "16"]
        shape += ["--buffer", "8", "--cap-gib", "0.0005"]
    else:
        shape = ["--shape", "r1-llama-8b", "--layers", str(args.layers), "--prompts", "64", "--min-new", "64"]
        shape += ["--max-new", "2048", "--budget", "256", "--buffer", "128", "--cap-gib", "1"]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    paths = ["stock-static", "hf-continuous", "rkv-engine"]
    return run_benchmark("serving.py", "--device", args.device, *shape, "--dtype", dtype, "--paths", *paths)


def run_benchmark(script: str, *options: str) -> dict:
    """Run a bench/ script in its own process; its exit status, log tail and result (its files are removed: the
    part's JSON holds it)."""
    name = f"gpu-{Path(script).stem}-run"
    command = [sys.executable, str(HERE / script), *options, "--out", name]
    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
    produced = HERE / "results" / f"{name}.json"
    result = {"returncode": done.returncode, "log_tail": (done.stdout + done.stderr)[-4000:]}
    if produced.exists():
        result["result"] = json.loads(produced.read_text())
        for suffix in (".json", ".md", ".png"):
            (HERE / "results" / f"{name}{suffix}").unlink(missing_ok=True)
    return result


def run_part(name: str, args) -> None:
    strict(args.device)
    result = globals()[f"part_{name}"](args)
    write(Path(args.out), name, result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, for a rehearsal on a CPU")
    parser.add_argument("--layers", type=int, default=8, help="layers of the R1-Distill-Llama-8B shape to build")
    parser.add_argument("--parts", default=DEFAULT_PARTS)
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args)
        return 0
    out = Path(args.out)
    summary = []
    for name in args.parts.split(","):
        start = time.perf_counter()
        command = [sys.executable, __file__, "--part", name, *(argv if argv is not None else sys.argv[1:])]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PARTS[name], env=os.environ)
            status = "ok" if done.returncode == 0 else f"failed ({done.returncode})"
            tail = (done.stdout + done.stderr)[-2000:]
        except subprocess.TimeoutExpired as timeout:
            status, tail = f"timed out after {PARTS[name]} s", str(timeout.stderr or "")[-2000:]
        summary.append({"part": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "tail": tail})
        write(out, "summary", {"parts": summary})
        print(f"[gpu_check] {name}: {status} in {summary[-1]['seconds']} s", flush=True)
        if name == "env":
            env = json.loads((out / "gpu-env.json").read_text()) if (out / "gpu-env.json").exists() else {}
            if not env.get("ok"):
                print(
                    f"[gpu_check] transformers {env.get('transformers')} imported, {REQUIRED_TRANSFORMERS} needed: stop"
                )
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
