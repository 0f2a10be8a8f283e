"""Long prompts: peak memory and prefill time of stock transformers against rkv_flex, then decode speed.

Each point runs in a fresh process: the bundled SmolLM2 reads a prompt of real text (GSM8K and MATH-500 problems
concatenated, then a final question) of the given length, and generates --new-tokens greedy tokens through the
model's own ``generate``: stock (sdpa + DynamicCache), or patched by rkv_flex at --budget (the prompt fed in
``prefill_chunk`` pieces). Each process first warms up on a short prompt (so one-off compiling is not measured),
then resets the kernel's resident-memory high-water mark. Reported per point: the peak resident memory of the
generation above what the process held just before it (VmHWM - VmRSS from /proc), the prefill time (to the first
new token), and the median decode step.

    python bench/long_context.py                              # 1K-32K both paths, 64K rkv_flex only (CPU: ~30 min)
    python bench/long_context.py --lengths 1024 4096 --paths rkv
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import StepClock, environment, long_prompt, publish

PATHS = ("stock", "rkv")


def memory_status(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def measure(path: str, length: int, args) -> dict:
    """One point, in this (fresh) process."""
    from rkv_flex import make_cache, patch_model
    from rkv_flex.tools.bundled import load_model

    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    ids = long_prompt(tokenizer, length)
    if path == "rkv":
        patch_model(model, budget=args.budget, buffer=args.buffer, prefill_chunk=args.chunk)
    warm = long_prompt(tokenizer, 4 * args.chunk)  # every chunk shape a long prompt meets, staged ones included
    model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)
    options = {"cache": make_cache(model)} if path == "rkv" else {}
    reset_peak_memory()
    before = memory_status("VmRSS")
    clock = StepClock()
    start = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        streamer=clock,
        **options,
    )
    steps = clock.step_times()
    result = {
        "path": path,
        "prompt": length,
        "rss_before_bytes": before,
        "peak_above_before_bytes": memory_status("VmHWM") - before,
        "prefill_seconds": clock.stamps[0] - start,
        "decode_step_ms": 1e3 * statistics.median(steps),
    }
    if path == "rkv":
        result["kv_bytes"] = options["cache"].kv_bytes
        result["compactions"] = options["cache"].compactions
    return result


def run_point(path: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--point", path, str(length), *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"path": path, "prompt": length, "error": (done.stdout + done.stderr)[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    rows = result["points"]
    lines = [
        f"Bundled SmolLM2-135M, fp32, {result['args']['new_tokens']} new tokens; rkv_flex at budget "
        f"{result['args']['budget']}, buffer {result['args']['buffer']}, prefill_chunk {result['args']['chunk']}. "
        "Peak = the generation's peak resident memory above what the process held just before it (model loaded, "
        "one-off compiling done).\n",
        "| prompt tokens | stock peak | rkv peak | stock prefill | rkv prefill | stock step | rkv step |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in sorted({row["prompt"] for row in rows}):
        cells = []
        for key, unit in (("peak_above_before_bytes", "mib"), ("prefill_seconds", "s"), ("decode_step_ms", "ms")):
            for path in PATHS:
                row = next((r for r in rows if r["prompt"] == length and r["path"] == path), None)
                if row is None or key not in row:
                    cells.append("-" if row is None else "failed")
                elif unit == "mib":
                    cells.append(f"{row[key] / 2**20:.0f} MiB")
                else:
                    cells.append(f"{row[key]:.1f} {unit}")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    for target in result["targets"]:
        lines.append(f"\n{target}")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    rkv = {r["prompt"]: r for r in rows if r["path"] == "rkv" and "error" not in r}
    found = []
    span = [length for length in rkv if 4096 <= length <= 32768]
    if len(span) >= 2:
        low, high = rkv[min(span)], rkv[max(span)]
        ratio = high["peak_above_before_bytes"] / low["peak_above_before_bytes"]
        found.append(
            f"rkv_flex peak above the weights from {min(span)} to {max(span)} tokens: {ratio:.2f}x "
            f"(target <= 1.5x): {'met' if ratio <= 1.5 else 'not met'}"
        )
    longest = max(rkv, default=None)
    if longest:
        found.append(f"longest prompt rkv_flex ran here: {longest} tokens")
    stock = {r["prompt"]: r for r in rows if r["path"] == "stock"}
    failed = sorted(length for length, r in stock.items() if "error" in r)
    found.append(
        f"stock failed from {failed[0]} tokens" if failed else f"stock ran every length measured ({max(stock)} max)"
    )
    return found


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in PATHS:
        rows = sorted(
            (r for r in result["points"] if r["path"] == name and "error" not in r), key=lambda r: r["prompt"]
        )
        lengths = [r["prompt"] for r in rows]
        axes[0].plot(lengths, [r["peak_above_before_bytes"] / 2**20 for r in rows], "o-", label=name)
        axes[1].plot(lengths, [r["prefill_seconds"] for r in rows], "o-", label=name)
        axes[2].plot(lengths, [r["decode_step_ms"] for r in rows], "o-", label=name)
    titles = ("peak memory above the weights (MiB)", "prefill (s)", "decode step after the prompt (ms)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set(xlabel="prompt tokens", title=title, xscale="log")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--stock-max", type=int, default=32768, help="longest prompt given to stock transformers")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=257)
    parser.add_argument("--out", default="long-context-smollm2")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)  # internal: measure one point here
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure(args.point[0], int(args.point[1]), args)))
        return 0
    started = time.perf_counter()
    points = []
    for length in args.lengths:
        for path in args.paths:
            if path == "stock" and length > args.stock_max:
                continue
            points.append(run_point(path, length, args))
            print(json.dumps({k: v for k, v in points[-1].items() if k != "error"}), flush=True)
    result = {"args": vars(args), "environment": environment(), "points": points}
    result["minutes"] = (time.perf_counter() - started) / 60
    result["targets"] = targets(points)
    publish(args.out, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
