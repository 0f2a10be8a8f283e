"""Decode throughput and KV memory: rkv_flex against the stock transformers paths, measured in one run.

Methods (same model, same prompt, greedy, no early stop):
  stock-eager            transformers generate, sdpa + DynamicCache (the full cache)
  stock-static-compiled  transformers generate, StaticCache + torch.compile (fullgraph, static shapes)
  rkv-eager              patch_model + transformers generate
  rkv-compiled           patch_model + rkv_flex.generate (compiled decode and compaction graphs)

Parts:
  A  batch 1: step time and KV bytes against the generated length (up to --new-tokens), whole-run averages;
     "step time at context L" is the median over the 128 steps that end at L. StaticCache pays its whole static
     length every step, so it is measured by one 128-step run per L with max_cache_len = L.
  B  batch --batch at context --batch-context: 128 steps after a prefill of (context - 128) tokens.
  C  compaction: its share of rkv-compiled decode time (from part A's step times) and the compaction graph alone.
  D  fixed KV memory cap: the largest batch each method fits at --cap-length generated tokens, and its tokens/s.
Every ratio is printed beside the prediction (weight bytes + baseline KV bytes read per step) /
(weight bytes + rkv_flex KV bytes read per step).

    python bench/throughput.py                       # CPU, bundled SmolLM2-135M (about 90 minutes on 2 cores)
    python bench/throughput.py --device cuda --shape r1-llama-8b --dtype bfloat16 --cap-gib 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, Shape, StepClock, environment, median_ms, random_prompt, write_json

from rkv_flex import RKVConfig, generate, make_cache, patch_model, unpatch_model
from rkv_flex.cli import DTYPES
from rkv_flex.decode import last_cache

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
    "r1-qwen-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=10000.0,
        max_position_embeddings=131072,
    ),
}
WINDOW = 128  # steps per "step time at context L"
METHODS = ["stock-eager", "stock-static-compiled", "rkv-eager", "rkv-compiled"]


def load(args):
    if args.shape == "smollm2":
        from rkv_flex.bundled import chat_prompt, load_model, load_problems

        model, tokenizer = load_model(dtype=DTYPES[args.dtype], device=args.device)
        text = chat_prompt(tokenizer, load_problems("gsm8k", 1)[0].question)
        return model, tokenizer(text, return_tensors="pt").input_ids.to(args.device)
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).eval()
    return model, random_prompt(1, 128, config.vocab_size, args.device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_config():
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    return config


def hf_generate(model, ids, new_tokens, label, **options) -> StepClock:
    clock = StepClock(total=new_tokens, label=label)
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


def run_stock_eager(model, ids, new_tokens) -> StepClock:
    return hf_generate(model, ids, new_tokens, "stock-eager")


def run_static(model, ids, new_tokens) -> StepClock:
    length = ids.shape[1] + new_tokens
    options = dict(cache_implementation="static", compile_config=compile_config(), max_cache_len=length)
    hf_generate(model, ids, 3, "static warm-up", **options)  # compiles for this batch and max_cache_len
    return hf_generate(model, ids, new_tokens, "stock-static-compiled", **options)


def run_rkv_eager(model, ids, new_tokens, cache) -> StepClock:
    return hf_generate(model, ids, new_tokens, "rkv-eager", cache=cache)


def run_rkv_compiled(model, ids, new_tokens, chunk: int | None = None) -> StepClock:
    generate(model, ids, max_new_tokens=3, eos_token_id=[], prefill_chunk=chunk)  # compiles the decode graph
    last_cache(model).compact()  # and the compaction graph, without decoding until the slots fill
    clock = StepClock(total=new_tokens, label="rkv-compiled")
    generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock, prefill_chunk=chunk)
    return clock


_RKV: dict = {}


def at_context(clock: StepClock, prompt: int, context: int) -> float | None:
    """Median step time (ms) over the WINDOW steps whose context ends at ``context`` (None if not reached)."""
    times = clock.step_times()  # decode step i (0-based) attends prompt + i + 1 tokens
    end = context - prompt - 1
    if end < WINDOW - 1 or end >= len(times):
        return None
    return median_ms(times[end - WINDOW + 1 : end + 1])


def predicted(shape: Shape, batch: int, baseline_tokens: float, rkv_tokens: float) -> float:
    """Bytes-streamed ceiling of a step-rate ratio: (weights + baseline KV read) / (weights + rkv_flex KV read)."""
    per_token = shape.kv_bytes_per_token * batch
    return (shape.weight_bytes + per_token * baseline_tokens) / (shape.weight_bytes + per_token * rkv_tokens)


def part_a(model, prompt_ids, args, shape, capacity) -> dict:
    prompt = prompt_ids.shape[1]
    final = prompt + args.new_tokens - 1  # the context of the last decode step
    lengths = sorted({capacity, *[length for length in args.lengths if length < final], final})
    clocks, kv_rkv = {}, None
    if "stock-eager" in args.methods:
        clocks["stock-eager"] = run_stock_eager(model, prompt_ids, args.new_tokens)
    patch_model(model, **_RKV)
    if "rkv-eager" in args.methods:
        cache = make_cache(model)
        clocks["rkv-eager"], kv_rkv = run_rkv_eager(model, prompt_ids, args.new_tokens, cache), cache.kv_bytes
    if "rkv-compiled" in args.methods:
        clocks["rkv-compiled"] = run_rkv_compiled(model, prompt_ids, args.new_tokens)
    unpatch_model(model)
    static = {}
    if "stock-static-compiled" in args.methods:
        for length in lengths:
            ids = random_prompt(1, length - WINDOW, model.config.vocab_size, args.device, seed=length)
            static[length] = median_ms(run_static(model, ids, WINDOW + 1).step_times())  # steps attend up to length
    rows = []
    for length in lengths:
        row = {"context": length, "stock-static-compiled": static.get(length)}
        for name in ("stock-eager", "rkv-eager", "rkv-compiled"):
            row[name] = at_context(clocks[name], prompt, length) if name in clocks else None
        row["kv_bytes"] = {
            "stock-eager": shape.kv_bytes_per_token * length,
            "stock-static-compiled": shape.kv_bytes_per_token * length,
            "rkv": shape.kv_bytes_per_token * capacity,
        }
        row["predicted_vs_static"] = predicted(shape, 1, length, capacity)  # the same ceiling over eager
        rows.append(row)
    averages = {name: 1e3 * statistics.mean(clock.step_times()) for name, clock in clocks.items()}
    if static:
        averages["stock-static-compiled"] = static[final]  # it pays max_cache_len = prompt + new tokens every step
    return {
        "prompt": prompt,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "whole_run_mean_ms": averages,
        "step_ms": {name: [1e3 * t for t in clock.step_times()] for name, clock in clocks.items()},
        "kv_bytes_at_end": {"stock-eager": shape.kv_bytes_per_token * (final + 1), "rkv (cache.kv_bytes)": kv_rkv},
    }


def part_b(model, args, shape, capacity) -> dict:
    batch, context = args.batch, args.batch_context
    ids = random_prompt(batch, context - WINDOW, model.config.vocab_size, args.device, seed=7)
    result = {"batch": batch, "context": context}
    if "stock-eager" in args.methods:
        result["stock-eager"] = median_ms(run_stock_eager(model, ids, WINDOW + 1).step_times())
    if "stock-static-compiled" in args.methods:
        result["stock-static-compiled"] = median_ms(run_static(model, ids, WINDOW + 1).step_times())
    patch_model(model, **_RKV)
    steps = run_rkv_compiled(model, ids, WINDOW + 1, chunk=_RKV["budget"]).step_times()
    result["rkv-compiled"] = median_ms(steps)
    unpatch_model(model)
    result["predicted_vs_static"] = predicted(shape, batch, context, capacity)
    return result


def part_c(model, prompt_ids, a: dict, args) -> dict:
    """Compaction share from the part A rkv-compiled step times, and the compaction graph timed alone."""
    steps = a["step_ms"]["rkv-compiled"]
    config = RKVConfig(**_RKV)
    prompt = prompt_ids.shape[1]
    # step i runs a compaction when the cache is full before it: prompt + i + 1 tokens fed exceeds the capacity
    compacting = {
        i
        for i in range(len(steps))
        if prompt + i + 1 > config.capacity and (prompt + i + 1 - config.capacity - 1) % config.buffer == 0
    }
    normal = statistics.median([t for i, t in enumerate(steps) if i not in compacting])
    extra = sum(steps[i] - normal for i in compacting)
    patch_model(model, **_RKV)
    cache = last_cache(model)
    alone = []
    for _ in range(5):
        sync(args.device)
        start = time.perf_counter()
        cache.compact()
        sync(args.device)
        alone.append(1e3 * (time.perf_counter() - start))
    unpatch_model(model)
    return {
        "compactions": len(compacting),
        "normal_step_ms": normal,
        "compaction_ms_in_situ": extra / max(1, len(compacting)),
        "compaction_ms_alone": statistics.median(alone),
        "share_of_decode_time": extra / sum(steps),
    }


def part_d(model, prompt_ids, args, shape, capacity) -> dict:
    prompt, generated = prompt_ids.shape[1], args.cap_length
    cap = int(args.cap_gib * 2**30)
    per_full = shape.kv_bytes_per_token * (prompt + generated)
    per_rkv = shape.kv_bytes_per_token * capacity
    batch_full, batch_rkv = cap // per_full, min(cap // per_rkv, args.max_batch)
    result = {"cap_bytes": cap, "generated": generated, "batch": {"full": batch_full, "rkv": batch_rkv}}
    if batch_full < 1:
        result["error"] = "the cap does not fit one full-cache sequence"
        return result
    vocab = model.config.vocab_size
    # full cache: a step costs more as the context grows; average four evenly spaced contexts over the run
    step_ms = []
    for quarter in (1, 2, 3, 4):
        context = prompt + quarter * generated // 4
        ids = random_prompt(batch_full, context - 16, vocab, args.device, seed=quarter)
        step_ms.append(median_ms(hf_generate(model, ids, 16, f"full batch {batch_full}").step_times()))
    result["full_step_ms_by_quarter"] = step_ms
    result["full_tokens_per_s"] = batch_full * 1e3 / statistics.mean(step_ms)
    patch_model(model, **_RKV)
    ids = random_prompt(batch_rkv, prompt, vocab, args.device, seed=5)
    config = RKVConfig(**_RKV)
    steps = (config.capacity - prompt) + 2 * config.buffer + 1
    clock = run_rkv_compiled(model, ids, steps)
    steady = clock.step_times()[-2 * config.buffer :]  # full slots: two compaction cycles
    unpatch_model(model)
    result["rkv_steady_step_ms"] = 1e3 * statistics.mean(steady)
    result["rkv_tokens_per_s"] = batch_rkv * len(steady) / sum(steady)
    result["batch_ratio"] = batch_rkv / batch_full
    result["throughput_ratio"] = result["rkv_tokens_per_s"] / result["full_tokens_per_s"]
    return result


def targets(a: dict, b: dict | None, c: dict | None, d: dict | None, capacity: int) -> list[dict]:
    found = []
    rows = {row["context"]: row for row in a["rows"]}
    first, top = rows.get(capacity, {}), rows[max(rows)]
    if first.get("rkv-compiled") and first.get("stock-static-compiled"):
        ratio = first["rkv-compiled"] / first["stock-static-compiled"]
        found.append(
            dict(
                target="before fill: rkv-compiled step within 10% of static+compile (same slots)",
                measured=f"{ratio:.2f}x static's step time",
                met=ratio <= 1.10,
            )
        )
    if top.get("stock-eager") and top.get("rkv-compiled"):
        speedup = top["stock-eager"] / top["rkv-compiled"]
        found.append(
            dict(
                target=f"step rate at {top['context']}: >= 1.8x stock eager",
                measured=f"{speedup:.2f}x",
                met=speedup >= 1.8,
            )
        )
    if top.get("stock-static-compiled") and top.get("rkv-compiled"):
        vs_static = top["stock-static-compiled"] / top["rkv-compiled"]
        share = vs_static / top["predicted_vs_static"]
        found.append(
            dict(
                target=f"step rate at {top['context']}: >= 90% of predicted ceiling over static+compile",
                measured=f"{vs_static:.2f}x vs predicted {top['predicted_vs_static']:.2f}x ({share:.0%})",
                met=share >= 0.9,
            )
        )
    kv = top["kv_bytes"]["rkv"] / top["kv_bytes"]["stock-eager"]
    found.append(
        dict(target=f"KV bytes at {top['context']} <= 10% of the full cache", measured=f"{kv:.1%}", met=kv <= 0.1)
    )
    if b and b.get("stock-static-compiled"):
        vs_static = b["stock-static-compiled"] / b["rkv-compiled"]
        share = vs_static / b["predicted_vs_static"]
        found.append(
            dict(
                target=f"batch {b['batch']} at {b['context']}: >= 90% of predicted ceiling over static",
                measured=f"{vs_static:.2f}x vs predicted {b['predicted_vs_static']:.2f}x ({share:.0%})",
                met=share >= 0.9,
            )
        )
    if c:
        found.append(
            dict(
                target="amortised compaction <= 10% of decode time",
                met=c["share_of_decode_time"] <= 0.1,
                measured=f"{c['share_of_decode_time']:.1%}",
            )
        )
    if d and "batch_ratio" in d:
        found.append(
            dict(
                target="fixed memory cap: >= 6x the full cache's largest batch",
                measured=f"{d['batch_ratio']:.1f}x batch, {d['throughput_ratio']:.2f}x tokens/s",
                met=d["batch_ratio"] >= 6,
            )
        )
    return found


def markdown(result: dict) -> str:
    a, lines = result["A"], []
    names = METHODS
    lines.append(
        f"Step time (ms, median of the {WINDOW} steps ending at the context), batch 1, "
        f"budget {_RKV['budget']}, buffer {_RKV['buffer']}:\n"
    )
    header = [*names, "rkv-compiled vs eager", "vs static (predicted)", "KV bytes rkv/full"]
    lines.append("| context | " + " | ".join(header) + " |")
    lines.append("|---" * (len(header) + 1) + "|")
    for row in a["rows"]:
        cells = [f"{row[n]:.1f}" if row[n] else "-" for n in names]
        rkv, eager, static = row["rkv-compiled"], row["stock-eager"], row["stock-static-compiled"]
        vs_eager = f"{eager / rkv:.2f}x" if eager and rkv else "-"
        vs_static = f"{static / rkv:.2f}x ({row['predicted_vs_static']:.2f}x)" if rkv and static else "-"
        kv = row["kv_bytes"]["rkv"] / row["kv_bytes"]["stock-eager"]
        lines.append(f"| {row['context']} | " + " | ".join(cells) + f" | {vs_eager} | {vs_static} | {kv:.1%} |")
    means = a["whole_run_mean_ms"]
    lines.append(
        f"\nWhole run ({a['new_tokens']} new tokens), mean ms/step: "
        + ", ".join(f"{n} {means[n]:.1f}" for n in names if n in means)
    )
    if result.get("B"):
        b = result["B"]
        lines.append(
            f"\nBatch {b['batch']} at context {b['context']} (ms/step): stock-eager {b['stock-eager']:.1f}, "
            f"static+compile {b['stock-static-compiled']:.1f}, rkv-compiled {b['rkv-compiled']:.1f}; "
            f"rkv vs static {b['stock-static-compiled'] / b['rkv-compiled']:.2f}x "
            f"(predicted {b['predicted_vs_static']:.2f}x), vs eager "
            f"{b['stock-eager'] / b['rkv-compiled']:.2f}x"
        )
    if result.get("C"):
        c = result["C"]
        lines.append(
            f"\nCompaction: {c['compaction_ms_in_situ']:.1f} ms in situ ({c['compaction_ms_alone']:.1f} ms "
            f"alone) every {_RKV['buffer']} steps of {c['normal_step_ms']:.1f} ms: "
            f"{c['share_of_decode_time']:.1%} of decode time"
        )
    if result.get("D") and "batch_ratio" in result["D"]:
        d = result["D"]
        lines.append(
            f"\nKV cap {d['cap_bytes'] / 2**30:.1f} GiB, {d['generated']} generated tokens: full cache fits "
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

    a = result["A"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, steps in a["step_ms"].items():
        contexts = [a["prompt"] + i + 1 for i in range(len(steps))]
        left.plot(contexts, steps, lw=0.6, alpha=0.8, label=name)
    static = [(row["context"], row["stock-static-compiled"]) for row in a["rows"] if row["stock-static-compiled"]]
    if static:
        left.plot(*zip(*static, strict=True), "ko--", label="stock-static-compiled (max_cache_len = context)")
    left.set(xlabel="context (tokens)", ylabel="ms per decode step", title="Decode step time, batch 1")
    left.set_yscale("log")
    left.legend(fontsize=8)
    contexts = [row["context"] for row in a["rows"]]
    right.plot(contexts, [row["kv_bytes"]["stock-eager"] / 2**20 for row in a["rows"]], "o-", label="full cache")
    right.plot(contexts, [row["kv_bytes"]["rkv"] / 2**20 for row in a["rows"]], "o-", label="rkv_flex")
    right.set(xlabel="context (tokens)", ylabel="KV MiB per sequence", title="KV memory")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=8192)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-context", type=int, default=4096)
    parser.add_argument("--cap-gib", type=float, default=1.0)
    parser.add_argument("--cap-length", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--parts", default="ABCD")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", default=None, help="result name (default throughput-<device>-<shape>)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if "C" in args.parts and "rkv-compiled" not in args.methods:
        parser.error("part C (compaction share) reads the rkv-compiled run: add it to --methods or drop C")
    _RKV.update(budget=args.budget, buffer=args.buffer)
    capacity = args.budget + args.buffer
    torch.manual_seed(0)
    model, prompt_ids = load(args)
    shape = Shape.of(model)
    name = args.out or f"throughput-{args.device}-{args.shape}"
    print(
        f"{args.shape} on {args.device} ({args.dtype}): {shape.weight_bytes / 2**20:.0f} MiB of weights, "
        f"{shape.kv_bytes_per_token / 1024:.1f} KiB of KV per token; prompt {prompt_ids.shape[1]} tokens"
    )
    result = {"args": vars(args), "environment": environment(), "shape": shape.__dict__}
    with torch.no_grad():
        result["A"] = part_a(model, prompt_ids, args, shape, capacity)
        result["B"] = part_b(model, args, shape, capacity) if "B" in args.parts else None
        result["C"] = part_c(model, prompt_ids, result["A"], args) if "C" in args.parts else None
        result["D"] = part_d(model, prompt_ids, args, shape, capacity) if "D" in args.parts else None
    result["targets"] = targets(result["A"], result["B"], result["C"], result["D"], capacity)
    write_json(f"{name}.json", result)
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
