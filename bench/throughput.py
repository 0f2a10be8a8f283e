"""Decode throughput and KV memory: rkv_flex's three user-facing paths against stock transformers and a floor,
all measured in one run.

Paths (the same model, greedy, end-of-sequence never stops a run):
  stock-eager       transformers generate, sdpa + DynamicCache (the full cache)
  stock-static      transformers generate with a StaticCache of prompt + new tokens, compiled (compile_config)
  rkv-eager         patch_model, then the model's own generate
  rkv-hf-compiled   patch_model, then the model's own generate with compile_config (its compiled decode step)
  rkv-compiled      patch_model, then rkv_flex's engine (compiled step and compaction graphs)
  floor             the engine's compiled step over 16 slots: what a step costs with (almost) no KV to read

Parts:
  A  batch 1, step time at each context: every path decodes WINDOW steps after a prompt of (context - WINDOW)
     tokens; median step, and its ratio to the floor. KV bytes per path.
  E  the one-line path: warm, the first WINDOW steps after the GSM8K prompt against stock eager; a 500-token answer
     at budget 128 (three compactions) against stock eager; the first call's one-off cost in a fresh process with
     an empty compile cache.
  B  batch --batch at context --batch-context.
  C  compaction share of decode time on the eager and the compiled path after the slots fill (four compactions;
     the eager loop's first falls in the prefill interval, so three are measured there).
  D  a fixed KV memory cap: the largest batch the full cache and rkv_flex fit at --cap-length generated tokens,
     and their tokens/s.
  F  head-adaptive budgets: the engine's compiled step and compaction with allocation="adaptive" (a pooled slot
     layout) against "uniform" at the same total slots, batch 1 and --batch, from slots that are full, through two
     compactions.

    python bench/throughput.py                    # CPU, bundled SmolLM2-135M
    python bench/throughput.py --device cuda --shape r1-llama-8b --dtype bfloat16 --cap-gib 100
    python bench/throughput.py --parts AF --out throughput-cpu-smollm2-AF
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
import itertools

from common import Shape, StepClock, environment, median_ms, publish, random_prompt

from rkv_flex import Engine, RKVConfig, make_cache, patch_model, unpatch_model
from rkv_flex.cli import DTYPES

SHAPES = {  # random-initialised configs of real models (throughput does not need trained weights)
    "r1-llama-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "tiny": dict(  # for dry runs of the GPU check on a CPU
        model_type="llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=16384,
    ),
    "mla-small": dict(  # multi-head latent attention at DeepSeek-V2-Lite's proportions, halved
        model_type="deepseek_v3",
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=4,
        first_k_dense_replace=4,  # dense feed-forward: the step's work is attention's and the projections'
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_group=1,
        topk_group=1,
        vocab_size=4096,
        max_position_embeddings=16384,
    ),
    "r1-qwen-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        rope_theta=10000.0,
        max_position_embeddings=131072,
    ),
}
WINDOW = 128  # steps per measured context
PATHS = ["stock-eager", "stock-static", "rkv-eager", "rkv-hf-compiled", "rkv-compiled"]
OPTIONAL_PATHS = ["rkv-compiled-sdpa"]  # the engine's compiled step with fused SDPA where it would use flex


def load(args):
    if args.shape == "smollm2":
        from rkv_flex.tools.bundled import chat_prompt, load_model, load_problems

        model, tokenizer = load_model(dtype=DTYPES[args.dtype], device=args.device)
        text = chat_prompt(tokenizer, load_problems("gsm8k", 1)[0].question)
        return model, tokenizer(text, return_tensors="pt").input_ids.to(args.device)
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(SHAPES[args.shape])
    if getattr(args, "layers", None):
        options["num_hidden_layers"] = args.layers  # fewer layers: the same per-layer work, less to compile
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).eval()
    return model, random_prompt(1, 128, config.vocab_size, args.device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_config(device: str):
    """transformers' compile settings as a user would pick them per device: its default mode (reduce-overhead:
    CUDA graphs) on a GPU; on a CPU, where there are no CUDA graphs, mode="default", because reduce-overhead's
    handling of mutated inputs costs about 6 ms per step there for nothing (measured on SmolLM2, 2 cores)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if device == "cuda" else "default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    return config


def hf_generate(model, ids, new_tokens, label, **options) -> StepClock:
    """transformers' generate with a clock on every token."""
    clock = StepClock(total=new_tokens if new_tokens > 200 else None, label=label)
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        **options,
    )
    return clock


def engine_steps(engine: Engine, ids, new_tokens: int, device: str) -> list[float]:
    """Seconds of each decode step of the engine (it reports every step: check_every=1)."""
    stamps = []
    for _ in engine.stream([ids[0].tolist()], max_new_tokens=new_tokens, eos_token_id=[]):
        sync(device)
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


class Paths:
    """Runs one path for ``new_tokens`` after ``ids``; returns the step times (s). Before its first measurement at a
    batch size (and, for the static cache, a length), a compiled path is warmed up with a prompt that fills the slots,
    so that compiling the step and the compaction never lands in a measurement."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.rkv = RKVConfig(budget=args.budget, buffer=args.buffer, policy=args.policy)
        self.engines: dict[tuple, Engine] = {}
        self.warm: set = set()

    def run(self, path: str, ids: torch.Tensor, new_tokens: int) -> list[float]:
        length = ids.shape[1] + new_tokens
        key = (path, self.rkv, ids.shape[0], length if path == "stock-static" else None)
        if path != "stock-eager" and key not in self.warm:
            self.warm.add(key)
            filling = random_prompt(ids.shape[0], self.rkv.capacity, self.args.vocab, self.args.device, seed=1)
            self._run(path, filling, 3, length)
        return self._run(path, ids, new_tokens, length)

    def _run(self, path: str, ids: torch.Tensor, new_tokens: int, length: int | None = None) -> list[float]:
        model = self.model
        if path == "stock-eager":
            return hf_generate(model, ids, new_tokens, path).step_times()
        if path == "stock-static":
            length = length or ids.shape[1] + new_tokens
            options = dict(
                cache_implementation="static", compile_config=compile_config(self.args.device), max_cache_len=length
            )
            return hf_generate(model, ids, new_tokens, path, **options).step_times()
        patch_model(
            model, self.rkv if path != "floor" else RKVConfig(budget=8, buffer=8, window=8, policy=self.args.policy)
        )
        try:
            if path == "rkv-eager":
                return hf_generate(model, ids, new_tokens, path, cache=make_cache(model)).step_times()
            if path == "rkv-hf-compiled":
                return hf_generate(
                    model, ids, new_tokens, path, compile_config=compile_config(self.args.device)
                ).step_times()
            engine = self.engine(path, ids.shape[0])
            return engine_steps(engine, ids, new_tokens, self.args.device)
        finally:
            unpatch_model(model)

    def fresh_graphs(self) -> None:
        """Before each part: forget every compiled graph, and re-warm each path on its next use. transformers'
        compiled generate traces through decorator code shared by every model forward, so the graphs of each
        static-cache length and batch count against one code object's limit of 8 (rkv_flex's own graphs belong to
        the patched model and do not)."""
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
        self.warm.clear()
        torch._dynamo.reset()

    def engine(self, path: str, batch: int) -> Engine:
        key = (path, batch, self.rkv)
        if key not in self.engines:
            engine = Engine(self.model, batch, check_every=1)
            if path == "rkv-compiled-sdpa":
                engine.cache.choose_decode_kernels = lambda: [
                    setattr(layer, "flex_decoding", False) for layer in engine.cache.attention
                ]
            self.engines[key] = engine
        return self.engines[key]


def at_contexts(paths: Paths, shape: Shape, args) -> list[dict]:
    rows = []
    for context in args.contexts:
        ids = random_prompt(1, context - WINDOW, shape.vocab, args.device, seed=context)
        row = {"context": context, "step_ms": {}}
        for path in [*args.paths, "floor"]:
            row["step_ms"][path] = median_ms(paths.run(path, ids, WINDOW + 1))
        capacity = args.budget + args.buffer
        row["kv_bytes"] = {"full": shape.kv_bytes_per_token * context, "rkv": shape.kv_bytes_per_token * capacity}
        if "stock-static" in row["step_ms"]:
            row["kv_bytes"]["stock-static"] = shape.kv_bytes_per_token * context  # max_cache_len = context
        rows.append(row)
        print(f"context {context}: " + ", ".join(f"{p} {ms:.1f}" for p, ms in row["step_ms"].items()), flush=True)
    return rows


def first_call_cost(args) -> dict:
    """Seconds of a first patched generate of 16 tokens in a fresh process with an empty compile cache, against
    the same for stock transformers."""
    code = f"""
import json, os, sys, tempfile, time
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, {str(Path(__file__).parent)!r})
from throughput import load, hf_generate
import argparse, torch
from rkv_flex import patch_model
args = argparse.Namespace(shape={args.shape!r}, dtype={args.dtype!r}, device={args.device!r})
model, ids = load(args)
start = time.perf_counter(); hf_generate(model, ids, 16, "stock"); stock = time.perf_counter() - start
patch_model(model, budget={args.budget}, buffer={args.buffer}, policy={args.policy!r})
start = time.perf_counter(); hf_generate(model, ids, 16, "rkv"); rkv = time.perf_counter() - start
start = time.perf_counter(); hf_generate(model, ids, 16, "rkv"); again = time.perf_counter() - start
print(json.dumps(dict(stock_first=stock, rkv_first=rkv, rkv_second=again)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def part_e(model, prompt_ids, paths: Paths, args) -> dict:
    first = {path: median_ms(paths.run(path, prompt_ids, WINDOW + 1)) for path in ("stock-eager", "rkv-eager")}
    answer = {}
    saved, paths.rkv = paths.rkv, RKVConfig(budget=128, buffer=128, policy=args.policy)
    for path in ("stock-eager", "rkv-eager"):
        paths.run(path, prompt_ids, 8)  # warm
        start = time.perf_counter()
        paths._run(path, prompt_ids, 500)
        answer[path] = time.perf_counter() - start
    paths.rkv = saved
    return {
        "first_steps_ms": first,
        "first_steps_ratio": first["rkv-eager"] / first["stock-eager"],
        "answer_500_seconds": answer,
        "answer_500_ratio": answer["rkv-eager"] / answer["stock-eager"],
        "first_call": first_call_cost(args),
    }


def part_b(paths: Paths, shape: Shape, args) -> dict:
    ids = random_prompt(args.batch, args.batch_context - WINDOW, shape.vocab, args.device, seed=7)
    steps = {path: median_ms(paths.run(path, ids, WINDOW + 1)) for path in [*args.paths, "floor"]}
    return {"batch": args.batch, "context": args.batch_context, "step_ms": steps}


def part_c(paths: Paths, shape: Shape, args) -> dict:
    """Decode from a prompt that fills the slots through four compactions; the compaction steps' excess over the
    median step, as a share of all decode time."""
    config = paths.rkv
    ids = random_prompt(1, config.capacity, shape.vocab, args.device, seed=11)
    result = {}
    for path, compactions in (("rkv-eager", 3), ("rkv-compiled", 4)):
        # the engine compacts inside the step that needs it (4 of these); transformers' loop compacts after a
        # step's logits, so its first compaction falls in the prefill interval (3 measured)
        steps = paths.run(path, ids, 4 * config.buffer + 1)
        normal = statistics.median(steps)
        extra = sum(sorted(steps)[-compactions:]) - compactions * normal
        result[path] = {
            "compactions": compactions,
            "normal_step_ms": 1e3 * normal,
            "compaction_ms": 1e3 * extra / compactions,
            "share_of_decode_time": extra / sum(steps),
        }
    return result


def part_d(model, prompt_ids, paths: Paths, shape: Shape, args) -> dict:
    prompt, generated = prompt_ids.shape[1], args.cap_length
    cap = int(args.cap_gib * 2**30)
    capacity = args.budget + args.buffer
    batch_full = cap // (shape.kv_bytes_per_token * (prompt + generated))
    batch_rkv = min(cap // (shape.kv_bytes_per_token * capacity), args.max_batch)
    result = {"cap_bytes": cap, "generated": generated, "batch": {"full": batch_full, "rkv": batch_rkv}}
    if batch_full < 1:
        result["error"] = "the cap does not fit one full-cache sequence"
        return result
    # the full cache's step grows with the context: average four evenly spaced contexts of the run
    full = []
    for quarter in (1, 2, 3, 4):
        ids = random_prompt(batch_full, prompt + quarter * generated // 4 - 16, shape.vocab, args.device, seed=quarter)
        full.append(median_ms(paths.run("stock-eager", ids, 17)))
    ids = random_prompt(batch_rkv, capacity, shape.vocab, args.device, seed=5)  # full slots: the steady state
    steps = paths.run("rkv-compiled", ids, 2 * args.buffer + 1)  # two compaction cycles
    result["full_step_ms_by_quarter"] = full
    result["full_tokens_per_s"] = batch_full * 1e3 / statistics.mean(full)
    result["rkv_step_ms"] = 1e3 * statistics.mean(steps)
    result["rkv_tokens_per_s"] = batch_rkv / statistics.mean(steps)
    result["batch_ratio"] = batch_rkv / batch_full
    result["throughput_ratio"] = result["rkv_tokens_per_s"] / result["full_tokens_per_s"]
    return result


def part_f(paths: Paths, shape: Shape, args) -> dict:
    """The compiled step and compaction of each allocation at the same total slots (median step; the compaction
    steps' excess over it)."""
    saved, result = paths.rkv, {}
    runs = [("rkv-compiled", batch) for batch in sorted({1, args.batch})] + [("rkv-eager", 1)]
    for path, batch in runs:
        ids = random_prompt(batch, saved.capacity, shape.vocab, args.device, seed=13)
        row = {"path": path, "batch": batch}
        for allocation in ("uniform", "adaptive"):
            paths.rkv = RKVConfig(budget=args.budget, buffer=args.buffer, allocation=allocation, policy=args.policy)
            steps = paths.run(path, ids, 2 * args.buffer + 1)
            normal = statistics.median(steps)
            row[allocation] = {
                "step_ms": 1e3 * normal,
                "compaction_ms": 1e3 * (sum(sorted(steps)[-2:]) - 2 * normal) / 2,
            }
        row["step_ratio"] = row["adaptive"]["step_ms"] / row["uniform"]["step_ms"]
        result[f"{path}/{batch}"] = row
        print("part F: " + json.dumps(row), flush=True)
    paths.rkv = saved
    return result


def targets(result: dict) -> list[dict]:
    found = []

    def add(target: str, measured: str, met: bool) -> None:
        found.append(dict(target=target, measured=measured, met=bool(met)))

    if f := result.get("F"):
        worst = max(row["step_ratio"] for row in f.values() if row["path"] == "rkv-compiled")
        add("adaptive layout's compiled step within 10% of uniform's", f"{worst:.3f}x at worst", worst <= 1.1)
    rows = result.get("A") or [{"context": None, "step_ms": {}}]
    top = rows[-1]
    steps = top["step_ms"]
    if "rkv-eager" in steps and "stock-eager" in steps:
        ratio = steps["stock-eager"] / steps["rkv-eager"]
        add(f"eager patched at {top['context']}: >= 1.5x stock eager", f"{ratio:.2f}x", ratio >= 1.5)
    if "rkv-compiled" in steps:
        worst = max(row["step_ms"]["rkv-compiled"] / row["step_ms"]["floor"] for row in rows)
        add("rkv-compiled within 10% of the floor at every context", f"{worst:.2f}x the floor at worst", worst <= 1.1)
        kv = top["kv_bytes"]["rkv"] / top["kv_bytes"]["full"]
        add(f"KV bytes at {top['context']} <= 10% of the full cache", f"{kv:.1%}", kv <= 0.1)
    if "rkv-hf-compiled" in steps and "rkv-compiled" in steps:
        gap = max(row["step_ms"]["rkv-hf-compiled"] / row["step_ms"]["rkv-compiled"] for row in rows)
        add("transformers' compiled generate within 1.10x of rkv_flex.generate", f"{gap:.2f}x at worst", gap <= 1.1)
    if e := result.get("E"):
        add(
            "eager patched, warm, first 128 steps: <= 1.05x stock eager",
            f"{e['first_steps_ratio']:.3f}x",
            e["first_steps_ratio"] <= 1.05,
        )
        add(
            "500-token answer at budget 128: <= 1.10x stock eager",
            f"{e['answer_500_ratio']:.3f}x",
            e["answer_500_ratio"] <= 1.10,
        )
    if c := result.get("C"):
        for path in ("rkv-eager", "rkv-compiled"):
            share = c[path]["share_of_decode_time"]
            add(f"{path}: amortised compaction <= 10% of decode time", f"{share:.1%}", share <= 0.1)
    if (d := result.get("D")) and "batch_ratio" in d:
        add(
            "fixed memory cap: >= 6x the full cache's largest batch",
            f"{d['batch_ratio']:.1f}x batch, {d['throughput_ratio']:.2f}x tokens/s",
            d["batch_ratio"] >= 6,
        )
    return found


def markdown(result: dict) -> str:
    args, lines = result["args"], []
    paths = [*args["paths"], "floor"]
    if f := result.get("F"):
        lines.append(
            f"Head-adaptive against uniform budgets, budget {args['budget']}, buffer {args['buffer']}, the same "
            "total slots (ms; a step is the median over two compaction cycles):\n"
        )
        lines.append(
            "| path | batch | uniform step | adaptive step | ratio | uniform compaction | adaptive compaction |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for row in f.values():
            uniform, adaptive = row["uniform"], row["adaptive"]
            lines.append(
                f"| {row['path']} | {row['batch']} | {uniform['step_ms']:.1f} | {adaptive['step_ms']:.1f} "
                f"| {row['step_ratio']:.3f} "
                f"| {uniform['compaction_ms']:.1f} | {adaptive['compaction_ms']:.1f} |"
            )
        lines.append("")
    if not result.get("A"):
        lines.append("\n| target | measured | met |\n|---|---|---|")
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
        return "\n".join(lines) + "\n"
    lines.append(
        f"Step time (ms, median of {WINDOW} decode steps at the context), batch 1, budget {args['budget']}, "
        f"buffer {args['buffer']}; in brackets, the ratio to the floor (the compiled step over 16 slots):\n"
    )
    lines.append("| context | " + " | ".join(paths) + " | KV bytes rkv/full |")
    lines.append("|---" * (len(paths) + 2) + "|")
    for row in result["A"]:
        floor = row["step_ms"]["floor"]
        cells = [f"{row['step_ms'][p]:.1f} ({row['step_ms'][p] / floor:.2f})" for p in paths]
        kv = row["kv_bytes"]["rkv"] / row["kv_bytes"]["full"]
        lines.append(f"| {row['context']} | " + " | ".join(cells) + f" | {kv:.1%} |")
    if e := result.get("E"):
        first = e["first_call"]
        lines.append(
            f"\nOne-line path: the first {WINDOW} steps after the GSM8K prompt, warm: rkv-eager "
            f"{e['first_steps_ms']['rkv-eager']:.1f} ms vs stock-eager {e['first_steps_ms']['stock-eager']:.1f} ms "
            f"({e['first_steps_ratio']:.3f}x); a 500-token answer at budget 128 (3 compactions): "
            f"{e['answer_500_seconds']['rkv-eager']:.1f} s vs {e['answer_500_seconds']['stock-eager']:.1f} s "
            f"({e['answer_500_ratio']:.3f}x). First call in a fresh process, empty compile cache, 16 tokens: "
            f"patched {first['rkv_first']:.1f} s (second call {first['rkv_second']:.1f} s) vs stock "
            f"{first['stock_first']:.1f} s."
        )
    if b := result.get("B"):
        lines.append(
            f"\nBatch {b['batch']} at context {b['context']} (ms/step): "
            + ", ".join(f"{p} {ms:.1f}" for p, ms in b["step_ms"].items())
        )
    if c := result.get("C"):
        lines.append(
            "\nCompaction, mean over the compactions measured after the slots fill: "
            + "; ".join(
                f"{p} ({v['compactions']} measured): {v['compaction_ms']:.1f} ms every {args['buffer']} steps of "
                f"{v['normal_step_ms']:.1f} ms = {v['share_of_decode_time']:.1%} of decode time"
                for p, v in c.items()
            )
        )
    if (d := result.get("D")) and "batch_ratio" in d:
        lines.append(
            f"\nKV cap {d['cap_bytes'] / 2**30:.1f} GiB, {d['generated']} generated tokens: the full cache fits "
            f"batch {d['batch']['full']} ({d['full_tokens_per_s']:.1f} tok/s), rkv-compiled batch "
            f"{d['batch']['rkv']} ({d['rkv_tokens_per_s']:.1f} tok/s): {d['batch_ratio']:.1f}x batch, "
            f"{d['throughput_ratio']:.2f}x tokens/s"
        )
    lines.append("\n| target | measured | met |\n|---|---|---|")
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("A")
    if not rows:
        return plot_allocations(result, path)
    contexts = [row["context"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in [*result["args"]["paths"], "floor"]:
        left.plot(contexts, [row["step_ms"][name] for row in rows], "o-" if name != "floor" else "k--", label=name)
    left.set(xlabel="context (tokens)", ylabel="ms per decode step", title="Decode step time, batch 1")
    left.set_xscale("log", base=2)
    left.legend(fontsize=8)
    right.plot(contexts, [row["kv_bytes"]["full"] / 2**20 for row in rows], "o-", label="full cache")
    right.plot(contexts, [row["kv_bytes"]["rkv"] / 2**20 for row in rows], "o-", label="rkv_flex")
    right.set(xlabel="context (tokens)", ylabel="KV MiB per sequence", title="KV memory")
    right.set_xscale("log", base=2)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_allocations(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = list(result["F"])
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    width = 0.38
    for offset, allocation in ((-width / 2, "uniform"), (width / 2, "adaptive")):
        steps = [result["F"][run][allocation]["step_ms"] for run in runs]
        axis.bar([i + offset for i in range(len(runs))], steps, width, label=allocation)
    axis.set_xticks(range(len(runs)), [run.replace("/", ", batch ") for run in runs])
    axis.set(ylabel="ms per decode step", title="Adaptive vs uniform budgets, same total slots")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--policy", default="rkv", help="the policy of every rkv path and the floor")
    parser.add_argument("--contexts", type=int, nargs="+", default=[640, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-context", type=int, default=4096)
    parser.add_argument("--cap-gib", type=float, default=1.0)
    parser.add_argument("--cap-length", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--parts", default="AEBCDF")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS + OPTIONAL_PATHS)
    )
    parser.add_argument("--out", default=None, help="result name (default throughput-<device>-<shape>)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.paths = args.paths.split(",")
    if unknown := set(args.paths) - set(PATHS) - set(OPTIONAL_PATHS):
        parser.error(f"unknown paths {sorted(unknown)}; choose from {PATHS + OPTIONAL_PATHS}")
    torch.manual_seed(0)
    model, prompt_ids = load(args)
    shape = Shape.of(model)
    args.vocab = shape.vocab
    name = args.out or f"throughput-{args.device}-{args.shape}"
    print(
        f"{args.shape} on {args.device} ({args.dtype}): {shape.weight_bytes / 2**20:.0f} MiB of weights, "
        f"{shape.kv_bytes_per_token / 1024:.1f} KiB of KV per token; prompt {prompt_ids.shape[1]} tokens",
        flush=True,
    )
    result = {"args": vars(args), "environment": environment(), "shape": shape.__dict__}
    started = time.perf_counter()
    paths = Paths(model, args)
    parts = {
        "A": lambda: at_contexts(paths, shape, args),
        "E": lambda: part_e(model, prompt_ids, paths, args) if args.shape == "smollm2" else None,
        "B": lambda: part_b(paths, shape, args),
        "C": lambda: part_c(paths, shape, args),
        "D": lambda: part_d(model, prompt_ids, paths, shape, args),
        "F": lambda: part_f(paths, shape, args),
    }
    with torch.no_grad():
        for part, measure in parts.items():
            if part in args.parts:
                paths.fresh_graphs()
                result[part] = measure()
            else:
                result[part] = None
    result["minutes"] = (time.perf_counter() - started) / 60
    result["targets"] = targets(result)
    publish(name, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
