"""Tensor parallelism on transformers' tp_plan: one process against N ranks, stock and patched, tokens and KV bytes.

Each point runs in its own process group: ``--ranks 1`` loads the model plainly, more ranks launch ``torchrun
--nproc-per-node N`` and load it with ``DistributedConfig(tp_plan="auto")``, which splits every attention module's
heads over the ranks. Each rank patches its own shard; R-KV scores and compacts the KV heads it holds, with no
communication beyond the model's own. Reported per point: decode tokens/s of stock ``model.generate`` and of the
patched model's ``model.generate``, KV bytes held per rank after decoding, and whether the greedy tokens equal the
single-process run's (the all-reduce adds in another order, so fp32 tokens may part after many steps).

On this CPU (2 cores) the bundled SmolLM2 has 3 KV heads, so it splits over 3 ranks, one thread each: a correctness
and memory check, not a speed test. On a multi-GPU machine (one process per GPU, NCCL):

    python bench/tensor_parallel.py --model /path/to/R1-Distill-Llama-8B --ranks 1 2 4 8 --device cuda \\
        --budget 1024 --new-tokens 2048 --out tensor-parallel-gpu

On this machine:

    python bench/tensor_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, publish


def prompt_ids(tokenizer) -> list[int]:
    from rkv_flex.tools.bundled import chat_prompt, load_problems

    return tokenizer(chat_prompt(tokenizer, load_problems("gsm8k", 1)[0].question)).input_ids


def timed_generate(model, ids: torch.Tensor, new: int, **options) -> tuple[list[int], float]:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        **options,
    )
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out[0, ids.shape[1] :].tolist(), new / (time.perf_counter() - start)


def measure(args) -> dict:
    """One rank's (or the single process's) measurements."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rkv_flex import make_cache, patch_model

    torch.set_grad_enabled(False)
    distributed = "WORLD_SIZE" in os.environ
    device = torch.device(args.device)
    if distributed and args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    options: dict = {"dtype": getattr(torch, args.dtype)}
    if distributed:
        from transformers.distributed import DistributedConfig

        options["distributed_config"] = DistributedConfig(tp_plan="auto")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **options).eval()
    if not distributed:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = torch.tensor([prompt_ids(tokenizer)], device=device)
    timed_generate(model, ids, 8)  # warm
    stock_tokens, stock_rate = timed_generate(model, ids, args.new_tokens)
    patch_model(model, budget=args.budget, buffer=args.buffer)
    timed_generate(model, ids, 8, cache=make_cache(model))  # warm: the flex kernels compile once
    cache = make_cache(model)
    patched_tokens, patched_rate = timed_generate(model, ids, args.new_tokens, cache=cache)
    return {
        "rank": int(os.environ.get("RANK", 0)),
        "ranks": int(os.environ.get("WORLD_SIZE", 1)),
        "kv_heads_held": cache.layers[0].slots.keys.shape[1],
        "stock_tokens": stock_tokens,
        "stock_tokens_per_s": stock_rate,
        "patched_tokens": patched_tokens,
        "patched_tokens_per_s": patched_rate,
        "kv_bytes": cache.kv_bytes,
        "compactions": cache.compactions,
        "prompt": ids.shape[1],
    }


def run_point(ranks: int, args, argv: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        worker = [__file__, *argv, "--model-dir", str(args.model_dir), "--worker-out", out]
        if ranks == 1:
            command = [sys.executable, *worker]
        else:
            torchrun = Path(sys.executable).with_name("torchrun")
            command = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks), *worker]
        environment_ = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
        done = subprocess.run(command, capture_output=True, text=True, env=environment_)
        if done.returncode != 0:
            raise RuntimeError(f"{ranks} rank(s) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return [json.loads(path.read_text()) for path in sorted(Path(out).glob("rank*.json"))]


def save_plain(model, tokenizer, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers directory (transformers refuses to save it as loaded, though
    its weights are already dequantised)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def summarise(points: dict[int, list[dict]]) -> list[dict]:
    single = points[1][0]
    rows = []
    for ranks, per_rank in points.items():
        lead = per_rank[0]
        rows.append(
            {
                "ranks": ranks,
                "kv_heads_per_rank": lead["kv_heads_held"],
                "kv_bytes_per_rank": lead["kv_bytes"],
                "kv_bytes_share_of_single": lead["kv_bytes"] / single["kv_bytes"],
                "stock_tokens_per_s": lead["stock_tokens_per_s"],
                "patched_tokens_per_s": lead["patched_tokens_per_s"],
                "compactions": lead["compactions"],
                "ranks_agree": all(r["patched_tokens"] == lead["patched_tokens"] for r in per_rank),
                "stock_first_difference_from_single": first_difference(lead["stock_tokens"], single["stock_tokens"]),
                "patched_first_difference_from_single": first_difference(
                    lead["patched_tokens"], single["patched_tokens"]
                ),
            }
        )
    return rows


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [
        f"{result['model']}, {args['dtype']}, {args['device']}, {result['prompt']}-token prompt + {args['new_tokens']} "
        f"greedy tokens, budget {args['budget']}, buffer {args['buffer']}; eager `model.generate` on each rank.\n",
        "| ranks | KV heads / rank | KV bytes / rank | share of 1 rank | stock tok/s | patched tok/s | ranks agree "
        "| first token ≠ 1 rank (stock / patched) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        differs = "/".join(
            "none" if row[key] is None else str(row[key])
            for key in ("stock_first_difference_from_single", "patched_first_difference_from_single")
        )
        lines.append(
            f"| {row['ranks']} | {row['kv_heads_per_rank']} | {row['kv_bytes_per_rank'] / 2**20:.2f} MiB "
            f"| {row['kv_bytes_share_of_single']:.3f} | {row['stock_tokens_per_s']:.1f} "
            f"| {row['patched_tokens_per_s']:.1f} | {row['ranks_agree']} | {differs} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [str(row["ranks"]) for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(labels, [row["kv_bytes_per_rank"] / 2**20 for row in rows])
    left.set(xlabel="ranks", ylabel="KV MiB per rank", title="KV cache held by each rank")
    width = 0.4
    x = range(len(rows))
    right.bar([i - width / 2 for i in x], [row["stock_tokens_per_s"] for row in rows], width, label="stock")
    right.bar([i + width / 2 for i in x], [row["patched_tokens_per_s"] for row in rows], width, label="patched")
    right.set_xticks(list(x), labels)
    right.set(xlabel="ranks", ylabel="decode tokens / s", title=f"Decode speed ({result['args']['device']})")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a transformers model directory (default: the bundled SmolLM2)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=384)
    parser.add_argument("--out", default="tensor-parallel-cpu")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)  # internal: the saved model
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)  # internal: measure this rank, write here
    args = parser.parse_args(argv)
    if args.worker_out:
        measured = measure(args)
        Path(args.worker_out, f"rank{measured['rank']}.json").write_text(json.dumps(measured))
        return 0
    if 1 not in args.ranks:
        parser.error("--ranks must include 1: every point is compared with the single process")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as saved:
        model_dir = Path(args.model) if args.model else Path(saved)
        if not args.model:  # tp_plan loading wants a transformers directory: save the bundled GGUF model as one
            from rkv_flex.tools.bundled import load_model

            save_plain(*load_model(), model_dir)
        args.model_dir = model_dir
        points = {ranks: run_point(ranks, args, argv) for ranks in sorted(args.ranks)}
    result = {
        "args": {k: v for k, v in vars(args).items() if k not in ("model_dir", "worker_out")},
        "environment": environment(),
        "model": args.model or "bundled SmolLM2-135M",
        "prompt": points[1][0]["prompt"],
        "rows": summarise(points),
        "per_rank": {  # the token lists are summarised in rows
            str(ranks): [{key: v for key, v in rank.items() if not key.endswith("_tokens")} for rank in per_rank]
            for ranks, per_rank in points.items()
        },
        "minutes": (time.perf_counter() - started) / 60,
    }
    publish(args.out, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
