"""Serving under a KV-memory cap: a queue of real prompts with long-tailed output lengths, four ways.

Every request has its own ``max_new_tokens``, drawn log-uniformly (fixed seed) between --min-new and --max-new, and
end-of-sequence never stops it, so every path does the same work. All paths get the same KV-cache memory cap
(--cap-gib of K and V):

  stock-static   transformers generate in static batches with DynamicCache; a batch is as large as the cap allows
                 for the longest possible request (its prompt plus --max-new tokens) and runs until its longest
                 request is done
  hf-continuous  transformers' own continuous batching (paged cache of the same capacity, per-request lengths)
  rkv-static     rkv_flex.generate in static batches: as many rows as budget + buffer slots fit in the cap
  rkv-engine     the rkv_flex engine with the same rows, refilled as requests finish

Reported per path: generated tokens per second (the requested tokens over the wall time), request latency from the
start of the run to the request's completion (p50, p95), and the peak resident memory of the process.

    python bench/serving.py                                           # 64 prompts, 128-4096 tokens, budget 512
    python bench/serving.py --min-new 64 --max-new 1024 --budget 128 --buffer 128 --cap-gib 0.25
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Shape, environment, publish

PATHS = ("stock-static", "hf-continuous", "rkv-static", "rkv-engine")


def workload(tokenizer, args) -> tuple[list[list[int]], list[int]]:
    from rkv_flex.tools.bundled import chat_prompt, load_problems

    half = args.prompts // 2
    problems = load_problems("gsm8k", half) + load_problems("math500", args.prompts - half)
    prompts = [tokenizer(chat_prompt(tokenizer, p.question)).input_ids for p in problems]
    rng = random.Random(args.seed)
    low, high = math.log(args.min_new), math.log(args.max_new)
    lengths = [round(math.exp(rng.uniform(low, high))) for _ in prompts]
    return prompts, lengths


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def in_batches(prompts, lengths, batch: int):
    for start in range(0, len(prompts), batch):
        yield list(range(start, min(start + batch, len(prompts))))


def stock_static(model, prompts, lengths, batch: int, pad: int) -> dict:
    latency, done, start = [0.0] * len(prompts), 0, time.perf_counter()
    for rows in in_batches(prompts, lengths, batch):
        ids, mask = left_padded([prompts[i] for i in rows], pad)
        longest = max(lengths[i] for i in rows)
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad,
        )
        for i in rows:
            latency[i] = time.perf_counter() - start
        done += len(rows)
        print(f"  stock-static: {done}/{len(prompts)} requests", flush=True)
    return {"latency": latency, "seconds": time.perf_counter() - start}


def rkv_static(model, prompts, lengths, batch: int, pad: int, warm_up: int) -> dict:
    from rkv_flex import generate

    for rows in {len(rows): rows for rows in in_batches(prompts, lengths, batch)}.values():  # each batch size
        ids, mask = left_padded([prompts[i] for i in rows], pad)
        generate(model, ids, mask, max_new_tokens=warm_up, eos_token_id=[], pad_token_id=pad)  # compiles
        generate(model, ids[:, -len(prompts[0]) :], None, max_new_tokens=warm_up, eos_token_id=[])  # rows in phase
    latency, start = [0.0] * len(prompts), time.perf_counter()
    for rows in in_batches(prompts, lengths, batch):
        ids, mask = left_padded([prompts[i] for i in rows], pad)
        generate(model, ids, mask, max_new_tokens=max(lengths[i] for i in rows), eos_token_id=[], pad_token_id=pad)
        for i in rows:
            latency[i] = time.perf_counter() - start
    return {"latency": latency, "seconds": time.perf_counter() - start}


def rkv_engine(model, prompts, lengths, batch: int, pad: int, warm_up: int) -> dict:
    from rkv_flex import Engine

    latency = [0.0] * len(prompts)
    with Engine(model, batch_size=batch) as engine:
        # compile outside the clock: the step, compaction of one row and of all rows (rows in phase)
        engine.generate(prompts[:batch], max_new_tokens=warm_up, eos_token_id=[])
        engine.generate([prompts[0]] * batch, max_new_tokens=warm_up, eos_token_id=[])
        start = time.perf_counter()
        for event in engine.stream(prompts, max_new_tokens=lengths, eos_token_id=[], pad_token_id=pad):
            if event.finished:
                latency[event.index] = time.perf_counter() - start
        seconds = time.perf_counter() - start
    return {"latency": latency, "seconds": seconds}


def hf_continuous(model, prompts, lengths, cap_bytes: int, shape: Shape) -> dict:
    """transformers' continuous batching (5.24) with a paged cache of ``cap_bytes``: requests wait when it is full,
    and one that runs out of room is recomputed later. End-of-sequence id -1 means none."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 16
    blocks = cap_bytes // (shape.kv_bytes_per_token * page)
    config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=blocks,
        max_batch_tokens=256,  # tokens per forward (its default, 8192, builds masks of hundreds of MB on a CPU)
        max_requests_per_batch=len(prompts),
        allow_block_sharing=False,  # no prefix cache: the cap holds live requests only
        use_cuda_graph=False,
        use_async_batching=False,
        default_compile_level=0,
        auto_switch_to_flash=False,
        cpu_offload_space=0.0,
        max_blocks_per_request=0,
    )
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(lengths))
    latency = [0.0] * len(prompts)
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for index, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
            manager.add_request(list(prompt), request_id=str(index), max_new_tokens=length, eos_token_id=-1)
        finished = 0
        while finished < len(prompts):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before finishing")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                latency[int(result.request_id)] = time.perf_counter() - start
                finished += 1
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=30)
        manager.destroy()
    return {"latency": latency, "seconds": seconds, "num_blocks": blocks, "page_size": page}


def run_path(path: str, args) -> dict:
    """One path in this (fresh) process."""
    import resource

    from rkv_flex import patch_model
    from rkv_flex.tools.bundled import load_model

    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    shape = Shape.of(model)
    prompts, lengths = workload(tokenizer, args)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cap = int(args.cap_gib * 2**30)
    longest = max(len(p) for p in prompts) + args.max_new
    full_batch = max(1, cap // (shape.kv_bytes_per_token * longest))
    rkv_batch = max(1, min(cap // (shape.kv_bytes_per_token * (args.budget + args.buffer)), args.max_batch))
    if path.startswith("rkv"):
        patch_model(model, budget=args.budget, buffer=args.buffer)
    warm_up = args.budget + args.buffer + 2  # every row compacts once
    if path == "stock-static":
        result = stock_static(model, prompts, lengths, full_batch, pad) | {"batch": full_batch}
    elif path == "rkv-static":
        result = rkv_static(model, prompts, lengths, rkv_batch, pad, warm_up) | {"batch": rkv_batch}
    elif path == "rkv-engine":
        result = rkv_engine(model, prompts, lengths, rkv_batch, pad, warm_up) | {"batch": rkv_batch}
    else:
        result = hf_continuous(model, prompts, lengths, cap, shape)
    result["tokens"] = sum(lengths)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["latency_p50"] = statistics.median(result["latency"])
    result["latency_p95"] = sorted(result["latency"])[math.ceil(0.95 * len(lengths)) - 1]
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["path"] = path
    return result


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [
        f"{args['prompts']} GSM8K / MATH-500 prompts, max_new_tokens log-uniform in [{args['min_new']}, "
        f"{args['max_new']}] (seed {args['seed']}, {result['tokens']} tokens in all, EOS never stops a request), "
        f"KV cap {args['cap_gib']} GiB, rkv_flex budget {args['budget']} + buffer {args['buffer']}; bundled "
        "SmolLM2-135M, fp32, 2 CPU cores.\n",
        "| path | rows | tokens/s | latency p50 (s) | latency p95 (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for path, row in result["paths"].items():
        if "error" in row:
            lines.append(f"| {path} | - | failed: {row['error'][:80]} | - | - | - |")
            continue
        rows = row.get("batch", f"{row.get('num_blocks')} pages of {row.get('page_size')}")
        lines.append(
            f"| {path} | {rows} | {row['tokens_per_s']:.1f} | {row['latency_p50']:.0f} | {row['latency_p95']:.0f} | "
            f"{row['peak_rss_bytes'] / 2**20:.0f} |"
        )
    lines.append("\n| target | measured | met |\n|---|---|---|")
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def targets(paths: dict) -> list[dict]:
    engine = paths.get("rkv-engine", {}).get("tokens_per_s")
    found = []
    for other, needed in (("rkv-static", 1.5), ("stock-static", 6.0), ("hf-continuous", 3.0)):
        rate = paths.get(other, {}).get("tokens_per_s")
        if engine and rate:
            ratio = engine / rate
            found.append(
                dict(target=f"rkv-engine >= {needed}x {other} tokens/s", measured=f"{ratio:.2f}x", met=ratio >= needed)
            )
    return found


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: row for name, row in result["paths"].items() if "error" not in row}
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.bar(list(rows), [row["tokens_per_s"] for row in rows.values()])
    left.set(ylabel="generated tokens / s", title="Throughput under one KV cap")
    for name, row in rows.items():
        right.plot(
            sorted(row["latency"]), [(i + 1) / len(row["latency"]) for i in range(len(row["latency"]))], label=name
        )
    right.set(xlabel="seconds from the start to completion", ylabel="share of requests done", title="Latency")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-new", type=int, default=128)
    parser.add_argument("--max-new", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cap-gib", type=float, default=1.0)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--out", default="serving-smollm2")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # internal: one path in this process
    args = parser.parse_args(argv)
    if args.path:
        import json

        print(json.dumps(run_path(args.path, args)))
        return 0
    import json

    started = time.perf_counter()
    paths = {}
    for path in args.paths:
        command = [sys.executable, __file__, "--path", path, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            paths[path] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            paths[path] = {"error": (done.stdout + done.stderr)[-2000:]}
        print(path, {k: v for k, v in paths[path].items() if k != "latency"}, flush=True)
    tokens = next((row["tokens"] for row in paths.values() if "tokens" in row), 0)
    result = {"args": vars(args), "environment": environment(), "paths": paths, "tokens": tokens}
    result["minutes"] = (time.perf_counter() - started) / 60
    result["targets"] = targets(paths)
    publish(args.out, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
