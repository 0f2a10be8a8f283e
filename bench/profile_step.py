"""Where the eager decode step's time goes: stock transformers against a patched model, by operation, per step and
per layer; and one eager compaction.

The bundled SmolLM2 decodes after the GSM8K prompt (warm: everything compiled and allocated first); the torch
profiler records --steps decode steps of each path. Operations are grouped: the weight matmuls, the attention
kernel, KV-cache writes and copies, the rest of the per-layer arithmetic, and what no operation accounts for
(Python, dispatch, the generation loop).

    python bench/profile_step.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, StepClock, environment, write_json

GROUPS = {  # aten operation -> group (anything else: "other arithmetic")
    "weights (matmul)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention",
    ),
    "cache writes and copies": ("aten::copy_", "aten::cat", "aten::index_copy_", "aten::scatter_", "aten::fill_"),
}


def group_of(name: str) -> str:
    if name.startswith("## Call CompiledFxGraph") or name.startswith("Torch-Compiled Region"):
        return "compiled regions"
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other arithmetic" if name.startswith("aten::") else "framework (non-aten)"


def profile_generate(model, ids, steps: int, fresh_options=dict) -> dict:
    """fresh_options() gives each generate call its keyword arguments (a patched model takes a fresh cache)."""

    def run(count: int) -> StepClock:
        clock = StepClock()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=count,
            min_new_tokens=count,
            do_sample=False,
            streamer=clock,
            **fresh_options(),
        )
        return clock

    run(8)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        clock = run(steps + 1)
    wall = 1e3 * sum(clock.step_times()) / steps
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith(("## Call", "Torch-Compiled")):
            group = group_of(event.key)
            groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e3 / (steps + 1)
    groups["not in any operation (Python, dispatch, loop)"] = max(0.0, wall - sum(groups.values()))
    return {
        "ms_per_step": wall,
        "groups_ms_per_step": groups,
        "median_step_ms": 1e3 * statistics.median(clock.step_times()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--out", default="profile-step-smollm2")
    args = parser.parse_args(argv)
    from rkv_flex import make_cache, patch_model
    from rkv_flex.tools.bundled import chat_prompt, load_model, load_problems

    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    ids = tokenizer(chat_prompt(tokenizer, load_problems("gsm8k", 1)[0].question), return_tensors="pt").input_ids
    layers = model.config.num_hidden_layers
    result = {"args": vars(args), "environment": environment(), "prompt": ids.shape[1], "layers": layers}
    result["stock"] = profile_generate(model, ids, args.steps)
    patch_model(model, budget=args.budget, buffer=args.buffer)
    result["patched"] = profile_generate(model, ids, args.steps, lambda: {"cache": make_cache(model)})
    # one eager compaction of every layer, on slots filled by decoding
    cache = make_cache(model)
    model.generate(input_ids=ids, max_new_tokens=args.budget + args.buffer - ids.shape[1], do_sample=False, cache=cache)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        cache.compactor(cache.layers, cache.shared.counters, args.budget, None)
        timings.append(1e3 * (time.perf_counter() - start))
    result["eager_compaction_ms"] = statistics.median(timings)
    write_json(f"{args.out}.json", result)
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    layers = result["layers"]
    stock, patched = result["stock"], result["patched"]
    lines = [
        f"Eager decode step after the {result['prompt']}-token GSM8K prompt (bundled SmolLM2, {layers} layers, fp32, "
        f"2 CPU cores), mean over {result['args']['steps']} profiled steps; patched at budget "
        f"{result['args']['budget']}, buffer {result['args']['buffer']} (nothing evicted yet):\n",
        "| time per step | stock (ms) | patched (ms) | patched per layer (µs) |",
        "|---|---|---|---|",
    ]
    names = sorted(set(stock["groups_ms_per_step"]) | set(patched["groups_ms_per_step"]))
    for name in names:
        a, b = stock["groups_ms_per_step"].get(name, 0.0), patched["groups_ms_per_step"].get(name, 0.0)
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {1e3 * b / layers:.0f} |")
    lines.append(f"| **whole step** | **{stock['ms_per_step']:.2f}** | **{patched['ms_per_step']:.2f}** | |")
    lines.append(
        f"\nOne eager compaction of all {layers} layers: {result['eager_compaction_ms']:.1f} ms "
        f"(every {result['args']['buffer']} steps)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
