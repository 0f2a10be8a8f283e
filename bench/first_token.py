"""Time to the first token in a fresh process with an empty inductor cache: stock transformers, the patched
``model.generate``, and the compiled engine (``rkv_flex.generate``); then, in the engine's process, the gaps between
tokens of a long stream that compacts (no compile may land mid-answer).

Every measurement runs in its own process (``--worker``) with its own empty ``TORCHINDUCTOR_CACHE_DIR``, as a user's
first call would. Prompts: the demo's chat prompt (a GSM8K question, ~114 tokens), exactly ``prefill_chunk`` tokens,
and four chunks of real text.

    python bench/first_token.py                 # ~6 min on 2 CPU cores
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

BUDGET, BUFFER, CHUNK = 512, 128, 512
LENGTHS = ("chat", CHUNK, 4 * CHUNK)
STREAM_TOKENS = 720  # past the first compaction (at 640 slots) and on


def worker(path: str, length: str) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from rkv_flex import generate, patch_model
    from rkv_flex.cli import compile_seconds
    from rkv_flex.tools.bundled import chat_prompt, load_model, load_problems

    sys.path.insert(0, str(Path(__file__).parent))
    from common import long_prompt

    model, tokenizer = load_model()
    if length == "chat":
        question = load_problems("gsm8k", 1)[0].question
        ids = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt").input_ids
    else:
        ids = long_prompt(tokenizer, int(length))
    options = dict(max_new_tokens=1, do_sample=False)
    result = {"path": path, "prompt_tokens": ids.shape[1]}
    if path != "stock":
        patch_model(model, budget=BUDGET, buffer=BUFFER, prefill_chunk=CHUNK)
    start = time.perf_counter()
    with torch.no_grad():
        if path == "engine":
            generate(model, ids, **options)
        else:
            model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    result |= {"first_token_s": time.perf_counter() - start, "compile_s": compile_seconds()}
    if path == "engine":
        result["stream"] = stream_gaps(model, ids, generate, compile_seconds)
    return result


def stream_gaps(model, ids, generate, compile_seconds) -> dict:
    """A long stream after the first call: the largest gap between tokens and what compiled meanwhile."""
    import time

    import torch

    class Clock:
        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    import torch._dynamo.utils

    clock, graphs, compiled = Clock(), torch._dynamo.utils.counters["stats"]["unique_graphs"], compile_seconds()
    generate(model, ids, max_new_tokens=STREAM_TOKENS, eos_token_id=[], streamer=clock)
    gaps = [b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:], strict=False)]  # [0] is the prompt
    return {
        "tokens": STREAM_TOKENS,
        "median_gap_ms": 1e3 * sorted(gaps)[len(gaps) // 2],
        "max_gap_ms": 1e3 * max(gaps),
        "graphs_compiled_during_stream": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
        "compile_s_during_stream": compile_seconds() - compiled,
    }


def run(path: str, length: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, __file__, "--worker", path, str(length)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = [
        "| prompt tokens | stock first token (s) | patched model.generate (s) | ratio | compiled meanwhile (s) "
        "| rkv_flex.generate (s) | of which compiling (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        engine = row.get("engine")
        engine_cells = f"{engine['first_token_s']:.1f} | {engine['compile_s']:.1f}" if engine else "- | -"
        lines.append(
            f"| {row['prompt_tokens']} | {row['stock']['first_token_s']:.2f} | {row['patched']['first_token_s']:.2f} "
            f"| {row['patched']['first_token_s'] / row['stock']['first_token_s']:.2f}x "
            f"| {row['patched']['compile_s']:.1f} | {engine_cells} |"
        )
    stream = result["stream"]
    lines.append(
        f"\nrkv_flex.generate, {stream['tokens']} tokens after the first call (compactions at 640 slots): median gap "
        f"{stream['median_gap_ms']:.0f} ms, largest {stream['max_gap_ms']:.0f} ms, "
        f"{stream['graphs_compiled_during_stream']} graphs compiled during the stream."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [str(row["prompt_tokens"]) for row in rows]
    x = range(len(rows))
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.27
    axis.bar([i - width for i in x], [r["stock"]["first_token_s"] for r in rows], width, label="stock transformers")
    axis.bar(list(x), [r["patched"]["first_token_s"] for r in rows], width, label="patched model.generate")
    engine = [r["engine"]["first_token_s"] if "engine" in r else 0 for r in rows]
    axis.bar([i + width for i in x], engine, width, label="rkv_flex.generate (compiles)")
    axis.set_xticks(list(x), labels)
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("first token, fresh process (s)")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("Time to first token, empty inductor cache (SmolLM2-135M, 2 CPU cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="first-token-smollm2")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import environment, publish

    rows, stream = [], None
    for length in LENGTHS:
        row = {path: run(path, length) for path in ("stock", "patched")}
        if length in ("chat", 4 * CHUNK):
            row["engine"] = run("engine", length)
            stream = stream or row["engine"].pop("stream")
            row["engine"].pop("stream", None)
        row["prompt_tokens"] = row["stock"]["prompt_tokens"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"environment": environment(), "budget": BUDGET, "buffer": BUFFER, "prefill_chunk": CHUNK}
    result |= {"rows": rows, "stream": stream, "command": "python bench/first_token.py"}
    publish(args.out, result, markdown, plot)


if __name__ == "__main__":
    main()
