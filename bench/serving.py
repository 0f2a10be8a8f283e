"""Serving under a KV-memory cap: a queue of real prompts with long-tailed output lengths, four ways.

Every request has its own ``max_new_tokens``, drawn log-uniformly (fixed seed) between --min-new and --max-new, and
end-of-sequence never stops it, so every path does the same work. All paths get the same KV-cache memory cap
(--cap-gib of K and V):

  stock-static   transformers generate in static batches with DynamicCache; a batch is as large as the cap allows
                 for the longest possible request (its prompt plus --max-new tokens) and runs until its longest
                 request is done
  hf-continuous  transformers' own continuous batching (paged cache of the same capacity, per-request lengths)
  rkv-static     rkv_flex.generate in static batches: as many rows as budget + buffer slots fit in the cap
  rkv-engine     the rkv_flex engine with the same rows, refilled as requests finish, the longest request first
                 (its default order)
  rkv-engine-given  the same, refilled in the given order (first come, first served)

Reported per path: generated tokens per second (the requested tokens over the wall time), request latency from the
start of the run to the request's completion (p50, p95), and the peak resident memory of the process. The two
rkv_flex paths also report where their wall time went (``profile``): prefills (a request's prompt and first token),
compactions, the decode steps (forward and token choice), the host's collection of tokens, and the rest.

    python bench/serving.py                                           # 64 prompts, 128-4096 tokens, budget 512
    python bench/serving.py --min-new 64 --max-new 1024 --budget 128 --buffer 128 --cap-gib 0.25
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Shape, environment, publish
from throughput import SHAPES

from rkv_flex.cli import DTYPES

PATHS = ("stock-static", "hf-continuous", "rkv-static", "rkv-engine", "rkv-engine-given")


def workload(tokenizer, vocab: int, args) -> tuple[list[list[int]], list[int]]:
    """The prompts (the bundled model's real ones, or random tokens of 64-192 for a random model) and each
    request's output length."""
    rng = random.Random(args.seed)
    if tokenizer is not None:
        from rkv_flex.tools.bundled import chat_prompt, load_problems

        half = args.prompts // 2
        problems = load_problems("gsm8k", half) + load_problems("math500", args.prompts - half)
        prompts = [tokenizer(chat_prompt(tokenizer, p.question)).input_ids for p in problems]
    else:
        prompts = [[rng.randrange(100, vocab - 1) for _ in range(rng.randint(64, 192))] for _ in range(args.prompts)]
    low, high = math.log(args.min_new), math.log(args.max_new)
    lengths = [round(math.exp(rng.uniform(low, high))) for _ in prompts]
    return prompts, lengths


def load(args):
    """The bundled SmolLM2 with its tokenizer, or a random model of a named shape (``--shape``) without one."""
    if args.shape == "smollm2":
        from rkv_flex.tools.bundled import load_model

        return load_model(dtype=DTYPES[args.dtype], device=args.device)
    from throughput import load as load_shape

    return load_shape(args)[0], None


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


@contextlib.contextmanager
def phases() -> Iterator[dict[str, float]]:
    """Seconds spent in each phase of the engine's work (class-level wrappers, so the engines rkv_flex.generate
    keeps are measured too). On a CPU every call is synchronous, so wall time per call is the phase's cost."""
    from rkv_flex.cache import RKVCache
    from rkv_flex.engine import Engine

    spent: dict[str, float] = {"prefill": 0.0, "compaction": 0.0, "step": 0.0, "collect": 0.0}
    spent |= {"prefill calls": 0, "compaction calls": 0, "step calls": 0}
    targets = {"prefill": (Engine, "_start"), "compaction": (RKVCache, "_compact_rows"), "step": (Engine, "_step")}
    originals = {name: getattr(owner, attr) for name, (owner, attr) in targets.items()}
    originals["collect"] = Engine._collect

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                spent[f"{name} calls"] += 1

        return wrapper

    def collect(self, tokens):  # a generator: time each resumption, not the caller's work between them
        events = originals["collect"](self, tokens)
        while True:
            start = time.perf_counter()
            try:
                event = next(events)
            except StopIteration:
                spent["collect"] += time.perf_counter() - start
                return
            spent["collect"] += time.perf_counter() - start
            yield event

    for name, (owner, attr) in targets.items():
        setattr(owner, attr, timed(name, originals[name]))
    Engine._collect = collect
    try:
        yield spent
    finally:
        for name, (owner, attr) in targets.items():
            setattr(owner, attr, originals[name])
        Engine._collect = originals["collect"]


def profile(spent: dict[str, float], seconds: float) -> dict[str, float]:
    """Seconds per phase; compactions run inside steps (planned at their start) and are counted apart."""
    split = dict(spent, step=spent["step"] - spent["compaction"])
    split["other"] = seconds - sum(value for name, value in split.items() if not name.endswith("calls"))
    return split


def rkv_static(model, prompts, lengths, batch: int, pad: int, warm_up: int) -> dict:
    from rkv_flex import generate

    for rows in {len(rows): rows for rows in in_batches(prompts, lengths, batch)}.values():  # each batch size
        ids, mask = left_padded([prompts[i] for i in rows], pad)
        generate(model, ids, mask, max_new_tokens=warm_up, eos_token_id=[], pad_token_id=pad)  # compiles
        generate(model, ids[:, -len(prompts[0]) :], None, max_new_tokens=warm_up, eos_token_id=[])  # rows in phase
    latency = [0.0] * len(prompts)
    with phases() as spent:
        start = time.perf_counter()
        for rows in in_batches(prompts, lengths, batch):
            ids, mask = left_padded([prompts[i] for i in rows], pad)
            longest = max(lengths[i] for i in rows)
            generate(model, ids, mask, max_new_tokens=longest, eos_token_id=[], pad_token_id=pad)
            for i in rows:
                latency[i] = time.perf_counter() - start
        seconds = time.perf_counter() - start
    return {"latency": latency, "seconds": seconds, "profile": profile(spent, seconds)}


def rkv_engine(model, prompts, lengths, batch: int, pad: int, warm_up: int, order: str) -> dict:
    from rkv_flex import Engine

    latency = [0.0] * len(prompts)
    with Engine(model, batch_size=batch) as engine:
        # compile outside the clock: the step, compaction of one row and of all rows (rows in phase)
        engine.generate(prompts[:batch], max_new_tokens=warm_up, eos_token_id=[])
        engine.generate([prompts[0]] * batch, max_new_tokens=warm_up, eos_token_id=[])
        with phases() as spent:
            start = time.perf_counter()
            events = engine.stream(prompts, max_new_tokens=lengths, eos_token_id=[], pad_token_id=pad, order=order)
            for event in events:
                if event.finished:
                    latency[event.index] = time.perf_counter() - start
            seconds = time.perf_counter() - start
    return {"latency": latency, "seconds": seconds, "profile": profile(spent, seconds)}


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

    torch.set_grad_enabled(False)
    model, tokenizer = load(args)
    shape = Shape.of(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts, lengths = workload(tokenizer, vocab, args)
    if tokenizer is None:
        pad = 0
    else:
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
    elif path.startswith("rkv-engine"):
        order = "given" if path == "rkv-engine-given" else "longest-first"
        result = rkv_engine(model, prompts, lengths, rkv_batch, pad, warm_up, order) | {"batch": rkv_batch}
    else:
        result = hf_continuous(model, prompts, lengths, cap, shape)
    result["tokens"] = sum(lengths)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["latency_p50"] = statistics.median(result["latency"])
    result["latency_p95"] = sorted(result["latency"])[math.ceil(0.95 * len(lengths)) - 1]
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        result.pop("profile", None)  # its clocks time launches, not the GPU's work
    result["path"] = path
    return result


def markdown(result: dict) -> str:
    args = result["args"]
    env = result["environment"]
    if args.get("shape", "smollm2") == "smollm2":
        what, model = "GSM8K / MATH-500 prompts", "bundled SmolLM2-135M"
    else:
        what, model = "random prompts of 64-192 tokens", f"random-weight {args['shape']} ({args['layers']} layers)"
    where = env.get("device") or f"{env['threads']} CPU threads"
    lines = [
        f"{args['prompts']} {what}, max_new_tokens log-uniform in [{args['min_new']}, "
        f"{args['max_new']}] (seed {args['seed']}, {result['tokens']} tokens in all, EOS never stops a request), "
        f"KV cap {args['cap_gib']} GiB, rkv_flex budget {args['budget']} + buffer {args['buffer']}; {model}, "
        f"{args.get('dtype', 'float32')}, {where}.\n",
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
    profiled = {path: row["profile"] for path, row in result["paths"].items() if "profile" in row}
    if profiled:
        lines += [
            "\nWhere the wall time went (seconds, share; steps: forward and token choice, compactions apart):\n",
            "| path | decode steps | compactions | prefills | collecting tokens | other |",
            "|---|---|---|---|---|---|",
        ]
        for path, split in profiled.items():
            total = sum(split[name] for name in ("step", "compaction", "prefill", "collect", "other"))
            cells = [
                f"{split[name]:.1f} ({100 * split[name] / total:.1f}%)"
                for name in ("step", "compaction", "prefill", "collect", "other")
            ]
            cells[0] += f", {split['step calls']} steps"
            cells[2] += f", {split['prefill calls']} prompts"
            lines.append(f"| {path} | " + " | ".join(cells) + " |")
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
    p95, given_p95 = (paths.get(path, {}).get("latency_p95") for path in ("rkv-engine", "rkv-engine-given"))
    if p95 and given_p95:
        measured = f"{p95:.0f} s against {given_p95:.0f} s"
        target = "rkv-engine p95 latency <= rkv-engine-given's"
        found.append(dict(target=target, measured=measured, met=p95 <= given_p95))
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES], help="a random model of this shape")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
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
    if args.device == "cuda":
        result["environment"]["device"] = torch.cuda.get_device_name()
    result["minutes"] = (time.perf_counter() - started) / 60
    result["targets"] = targets(paths)
    publish(args.out, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
