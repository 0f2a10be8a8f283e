"""The ``rkv-flex`` command: check, generate, eval, bench (``rkv-flex --help`` lists them one per line)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local HF model directory or .gguf file (default: bundled SmolLM2-135M)")
    parser.add_argument("--budget", type=int, default=128, help="KV slots kept per layer and head (default 128)")
    parser.add_argument("--buffer", type=int, default=128, help="tokens decoded between compactions (default 128)")
    parser.add_argument("--window", type=int, default=8, help="newest tokens always kept (default 8)")
    parser.add_argument("--lam", type=float, default=0.1, help="R-KV importance weight in [0, 1] (default 0.1)")
    parser.add_argument(
        "--policy",
        default="auto",
        help="auto (TriAttention where it reads the model's RoPE, else R-KV), rkv, snapkv, streaming, h2o, random, "
        "full or triattention (default auto)",
    )
    parser.add_argument("--statistics", help="triattention: a calibration file (rkv-flex calibrate); default online")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rkv-flex",
        description="R-KV KV-cache compression for Hugging Face reasoning models (rkv-flex COMMAND --help for more).",
    )
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    check = commands.add_parser("check", help="is the compression running and right on this model and machine?")
    _add_cache_options(check)
    check.add_argument("--text", help="the prompt the model answers (default: a short word problem)")
    check.add_argument(
        "--answer-tokens", type=int, help="tokens the model answers (default: fill the slots + 2 x buffer)"
    )
    check.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    check.set_defaults(run=run_check)
    generate = commands.add_parser(
        "generate", help="stream a generation with a bounded R-KV cache (default: the bundled SmolLM2, GSM8K)"
    )
    _add_cache_options(generate)
    generate.add_argument("--prompt", help="the user message (default: the first GSM8K test question)")
    generate.add_argument("--max-new-tokens", type=int, default=512)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--compile", action="store_true", help="use the compiled decoding loop (rkv_flex.generate)")
    generate.set_defaults(run=run_generate)

    evaluate = commands.add_parser("eval", help="answer accuracy on GSM8K / MATH-500 per policy and budget")
    evaluate.add_argument("--model", help="local HF model directory or .gguf file (default: bundled SmolLM2-135M)")
    evaluate.add_argument("--dataset", choices=["gsm8k", "math500"], default="gsm8k")
    evaluate.add_argument("--limit", type=int, default=None, help="first N problems (default: all)")
    evaluate.add_argument("--policies", nargs="+", default=["full", "rkv", "snapkv"])
    evaluate.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    evaluate.add_argument("--buffer", type=int, default=128)
    evaluate.add_argument("--window", type=int, default=8)
    evaluate.add_argument("--lam", type=float, default=0.1)
    evaluate.add_argument("--max-new-tokens", type=int, default=1024)
    evaluate.add_argument("--batch", type=int, default=1)
    evaluate.add_argument("--no-compile", dest="compile", action="store_false", help="eager transformers generate")
    evaluate.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--out", help="write the results as JSON here")
    evaluate.set_defaults(run=run_eval)

    calibrate = commands.add_parser("calibrate", help="TriAttention's query statistics of a model over a text file")
    calibrate.add_argument("--model", help="local HF model directory or .gguf file (default: bundled SmolLM2-135M)")
    calibrate.add_argument("--text", required=True, help="a plain-text file the model reads")
    calibrate.add_argument("--out", required=True, help="the statistics file to write (safetensors)")
    calibrate.add_argument("--max-tokens", type=int, default=32768, help="read at most this many tokens (32768)")
    calibrate.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    calibrate.add_argument("--device", default="cpu")
    calibrate.set_defaults(run=run_calibrate)

    bench = commands.add_parser("bench", help="run bench/<name>.py (throughput, fidelity, retention) from a checkout")
    bench.add_argument("name", choices=["throughput", "fidelity", "retention"])
    bench.add_argument("options", nargs=argparse.REMAINDER)
    bench.set_defaults(run=run_bench)
    return parser


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


class TimedStreamer:
    """Passes tokens on to a streamer and stamps each batch of new tokens: (time, compile seconds so far, count)."""

    def __init__(self, inner):
        self.inner, self.stamps, self.prompt_seen = inner, [], False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.stamps.append((time.perf_counter(), compile_seconds(), value.numel()))
        self.prompt_seen = True
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools.bundled import load_model
    from .tools.calibrate import calibrate

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    text = Path(args.text)
    if not text.is_file():
        raise FileNotFoundError(f"--text: no file at {text}")
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device)
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[:, : args.max_tokens].to(args.device)
    tokens = calibrate(model, ids, args.out)
    print(f"[rkv-flex] query statistics of {tokens} tokens written to {args.out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from . import Engine, RKVConfig, make_cache, patch_model
    from .tools.bundled import chat_prompt, load_model, load_problems

    config = RKVConfig(
        budget=args.budget,
        buffer=args.buffer,
        window=args.window,
        lam=args.lam,
        policy=args.policy,
        statistics=args.statistics,
    )
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device)
    question = args.prompt if args.prompt is not None else load_problems("gsm8k", 1)[0].question
    inputs = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt").to(args.device)
    prompt_tokens = inputs.input_ids.shape[1]
    patch_model(model, config)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature else {}
    streamer = TimedStreamer(TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    print(f"[rkv-flex] {question}\n", flush=True)
    start = (time.perf_counter(), compile_seconds())
    if args.compile:
        with Engine(model, batch_size=1) as engine:
            streamer.put(inputs.input_ids)
            produced = []
            for event in engine.stream(
                [inputs.input_ids[0].tolist()], max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling
            ):
                produced += event.tokens
                if event.tokens:
                    streamer.put(torch.tensor(event.tokens))
            streamer.end()
            cache, new_tokens = engine.cache, len(produced)
            print(summary(model, cache, prompt_tokens, new_tokens, start, streamer.stamps))
        return 0
    torch.manual_seed(args.seed)
    cache = make_cache(model)
    output = model.generate(
        **inputs,
        cache=cache,
        max_new_tokens=args.max_new_tokens,
        streamer=streamer,
        **({"do_sample": False} | sampling),
    )
    print(summary(model, cache, prompt_tokens, output.shape[1] - prompt_tokens, start, streamer.stamps))
    return 0


def run_check(args: argparse.Namespace) -> int:
    import json

    from .tools.bundled import load_model
    from .tools.check import check

    model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device)
    settings = dict(budget=args.budget, buffer=args.buffer, window=args.window, lam=args.lam, policy=args.policy)
    if args.statistics is not None:
        settings["statistics"] = args.statistics
    report = check(model, tokenizer, args.text, answer_tokens=args.answer_tokens, **settings)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report.as_dict(), handle, indent=1, default=str)
    return 0 if report.compressing and report.compiled_equals_eager else 1


def run_eval(args: argparse.Namespace) -> int:
    import json

    from . import RKVConfig, patch_model, unpatch_model
    from .tools.bundled import load_model, load_problems
    from .tools.evaluate import evaluate

    configs = [
        RKVConfig(budget=budget, buffer=args.buffer, window=args.window, lam=args.lam, policy=policy)
        for policy in args.policies
        for budget in (args.budgets if policy != "full" else args.budgets[:1])
    ]
    if args.max_new_tokens < 1 or args.batch < 1:
        raise ValueError("--max-new-tokens and --batch must be >= 1")
    problems = load_problems(args.dataset, args.limit)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.device)
    rows = []
    print(f"{args.dataset}: {len(problems)} problems, greedy, {args.max_new_tokens} new tokens at most")
    print("| policy | budget | accuracy | correct | new tokens | tokens/s |\n|---|---|---|---|---|---|")
    for config in configs:
        patch_model(model, config)
        start = time.perf_counter()
        label = f"{config.policy} {'-' if config.policy == 'full' else config.budget}"

        def progress(state, label=label) -> None:
            print(f"  [{label}] {state}", file=sys.stderr, flush=True)

        correct, total, produced, answers = evaluate(
            model, tokenizer, problems, args.max_new_tokens, args.batch, args.compile, progress
        )
        seconds = time.perf_counter() - start
        unpatch_model(model)
        budget = "-" if config.policy == "full" else config.budget
        rows.append(
            dict(
                policy=config.policy,
                budget=budget,
                accuracy=correct / total,
                correct=correct,
                total=total,
                new_tokens=produced,
                seconds=seconds,
                answers=answers,
            )
        )
        print(
            f"| {config.policy} | {budget} | {correct / total:.3f} | {correct}/{total} | {produced} | "
            f"{produced / seconds:.1f} |",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"dataset": args.dataset, "model": args.model or "bundled SmolLM2-135M", "rows": rows}, handle, indent=1
            )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / f"{args.name}.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: the benchmarks ship with the source checkout")
    sys.argv = [str(script), *args.options]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def summary(
    model,
    cache,
    prompt_tokens: int,
    new_tokens: int,
    start: tuple[float, float],
    stamps: list[tuple[float, float, int]],
) -> str:
    """Time to the first token (prefill), time spent compiling (a one-off), the steady speed of decoding without it,
    and the KV slots and bytes held against what a full cache would hold."""
    from .patch import stock_kv_bytes

    seen = prompt_tokens + new_tokens
    full_bytes = stock_kv_bytes(model, seen)  # one row, as the cache holds
    held = cache.kv_bytes
    (first, compiled_first, _), (last, compiled_last, _) = stamps[0], stamps[-1]
    compiling = compiled_last - start[1]
    decode_seconds = last - first - (compiled_last - compiled_first)
    steady = (new_tokens - 1) / decode_seconds if new_tokens > 1 and decode_seconds > 0 else float("nan")
    return (
        f"\n[rkv-flex] {new_tokens} new tokens after a {prompt_tokens}-token prompt: first token after "
        f"{first - start[0]:.1f} s; compiling took {compiling:.1f} s of the run (a one-off: the inductor cache and "
        f"later calls skip it); decoding without it {steady:.1f} tokens/s\n"
        f"[rkv-flex] KV slots per layer and head: {cache.capacity} held (budget {cache.config.budget} + buffer "
        f"{cache.config.buffer}) vs {seen} for a full cache; {cache.compactions} compactions\n"
        f"[rkv-flex] KV bytes: {held / 2**20:.2f} MiB held vs {full_bytes / 2**20:.2f} MiB full "
        f"({100 * (1 - held / full_bytes):.0f}% saved)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"rkv-flex: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
