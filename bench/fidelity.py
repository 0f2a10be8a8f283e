"""Fidelity to the full cache: every policy and budget on the bundled SmolLM2 with real math prompts.

1. Trajectories: the full cache (stock transformers) samples --new-tokens tokens per prompt at the paper's setting
   (temperature 0.6, top-p 0.95, fixed seed; EOS suppressed so every trajectory is full length), one batch for all
   prompts (GSM8K and MATH-500, chat template). Sampling is Gumbel-max with noise fixed per generated position
   (rkv_flex.tools.shared_noise). Each trajectory's distinct-4-gram ratio is reported, so degenerate (looping) ones are
   visible.
2. Teacher-forced replay of each trajectory under each policy and budget, in chunks that end exactly where the
   slots fill (equivalent to decoding token by token; tests/test_replay.py proves it): at every generated position,
   top-1 agreement with the full cache's next-token argmax and KL(full || policy) of the next-token distribution.
3. Free-running: tokens each row generates under the policy, with the same sampling noise, before it first leaves
   its full-cache trajectory. With shared noise that is exactly the first position where the policy's own draw
   from its teacher-forced logits misses the trajectory's token (tests/test_replay.py checks it against real
   free-running generation), so it costs no extra decoding.
4. A lam / window sweep of R-KV at one budget, with each allocation.

A policy label ``NAME+adaptive`` runs the policy with head-adaptive budgets (RKVConfig.allocation="adaptive"); its
results also record how unevenly the heads shared the budget at the end (kept slots per head / budget, min and max
over layers, heads and rows). ``triattention`` keeps online statistics; ``triattention-calibrated`` reads statistics
calibrated on held-out GSM8K problems and answers (not among the prompts).

``--merge`` adds the given policies to an existing result file instead of writing a new one, after checking that
this run sampled the very same trajectories (a hash of the tokens); the added rows say when they were measured.

    python bench/fidelity.py    # default: 8 prompts x 1024 tokens, budgets 64-512
    python bench/fidelity.py --prompts 2 --new-tokens 4096 --budgets 128 256 512 1024 --out fidelity-smollm2-4k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BatchEncoding, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, long_prompt, publish

from rkv_flex import RKVConfig, patch_model
from rkv_flex.cache import RKVCache
from rkv_flex.forward import positions_from_mask
from rkv_flex.patch import layer_specs, query_statistics_inputs
from rkv_flex.tools.bundled import chat_batch, load_model, load_problems
from rkv_flex.tools.replay import replay
from rkv_flex.tools.shared_noise import SharedNoiseSampler, first_miss


def distinct_4gram_ratio(tokens: list[int]) -> float:
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / max(1, len(grams))


def sample_trajectories(model, tokenizer, args):
    half = args.prompts // 2
    problems = load_problems("gsm8k", half) + load_problems("math500", args.prompts - half)
    if args.long_prompt:  # every row a long document of problems ending in a question, the same length: no padding
        ids = torch.cat([long_prompt(tokenizer, args.long_prompt, first=7 * row) for row in range(args.prompts)])
        inputs = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    else:
        inputs = chat_batch(tokenizer, [p.question for p in problems])
    sampler = SharedNoiseSampler(
        inputs.input_ids.shape[1],
        seed=args.seed,
        suppress=[tokenizer.eos_token_id],
        temperature=args.temperature,
        top_p=args.top_p,
    )
    sequences = model.generate(
        **inputs,
        max_new_tokens=args.new_tokens,
        do_sample=False,  # the sampler turns the argmax into a sample
        logits_processor=LogitsProcessorList([sampler]),
        pad_token_id=tokenizer.pad_token_id,
    )
    mask = torch.cat([inputs.attention_mask, torch.ones_like(sequences[:, inputs.input_ids.shape[1] :])], dim=1)
    return problems, inputs, sequences, mask, sampler


def reference_log_probs(model, sequences, mask, prompt: int) -> torch.Tensor:
    """Full-cache next-token log-probs [B, N, V] (float16) at every generated position, in one stock forward."""
    positions = positions_from_mask(mask)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return torch.log_softmax(logits[:, prompt - 1 : -1].float(), dim=-1).half()


CALIBRATION = {"first": 200, "count": 120}  # GSM8K problems (questions and answers) the calibrated statistics read


def calibration_file(model, tokenizer) -> str:
    """TriAttention statistics of the model over held-out GSM8K problems with their worked answers."""
    import tempfile

    from rkv_flex.tools.calibrate import calibrate

    problems = load_problems("gsm8k")[CALIBRATION["first"] : CALIBRATION["first"] + CALIBRATION["count"]]
    text = "\n\n".join(f"Question: {p.question}\nAnswer: {p.answer}" for p in problems)
    path = str(Path(tempfile.mkdtemp()) / "statistics.safetensors")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :8192]
    calibrate(model, ids, path)
    return path


def configured(label: str, budget: int, buffer: int, statistics: str | None = None, **options) -> RKVConfig:
    """The config of a policy label: a policy name, with ``+adaptive`` for head-adaptive budgets;
    ``triattention-calibrated`` is TriAttention with the calibration file ``statistics``."""
    policy, _, allocation = label.partition("+")
    if policy == "triattention-calibrated":
        policy, options = "triattention", {**options, "statistics": statistics}
    return RKVConfig(budget=budget, buffer=buffer, policy=policy, allocation=allocation or "uniform", **options)


def head_shares(cache: RKVCache) -> list[float] | None:
    """Adaptive runs: the fewest and most slots a head kept at the end, as shares of the budget."""
    if cache.config.allocation != "adaptive":
        return None
    kept = torch.stack([layer.slots.kept for layer in cache.layers]).float() / cache.config.budget
    return [float(kept.min()), float(kept.max())]


def teacher_forced(model, config: RKVConfig, sequences, mask, prompt: int, reference, sampler):
    """Per row: top-1 agreement [B, N] with the full cache, KL(full || policy) [B, N], the first free-running
    divergence (tokens before the policy's own shared-noise draw first misses the trajectory), and the head shares
    of an adaptive cache."""
    cache = RKVCache(config, layer_specs(model, *query_statistics_inputs(model, config)))
    batch, generated = reference.shape[:2]
    agree = torch.zeros(batch, generated, dtype=torch.bool)
    stays = torch.ones(batch, generated, dtype=torch.bool)
    missed = torch.zeros(batch, dtype=torch.bool)
    kl = torch.zeros(batch, generated)
    for start, logits in replay(model, cache, sequences[:, :-1], mask[:, :-1], prompt):
        first = start - (prompt - 1)  # index of the generated token these logits predict
        span = slice(first, first + logits.shape[1])
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        full = reference[:, span].float()
        agree[:, span] = log_probs.argmax(-1) == full.argmax(-1)
        kl[:, span] = (full.exp() * (full - log_probs)).sum(-1)
        for offset in range(0, logits.shape[1], 32):  # draw only for rows still on the trajectory
            rows = (~missed).nonzero().flatten()
            if len(rows) == 0:
                break
            block = slice(first + offset, min(first + offset + 32, span.stop))
            drawn = sampler.choose(logits[:, offset : offset + 32], block.start, rows)
            stays[rows, block] = drawn == sequences[rows, prompt + block.start : prompt + block.stop]
            missed[rows] |= ~stays[rows, block].all(-1)
    return agree, kl, first_miss(stays).tolist(), head_shares(cache)


def summarise(agree, kl, diverged, shares=None) -> dict:
    return {
        "head_share_range": shares,
        "top1_agreement": float(agree.float().mean()),
        "kl_mean": float(kl.mean()),
        "kl_median": float(kl.median()),
        "first_divergence_median": statistics.median(diverged),
        "first_divergence": diverged,
        "agreement_by_position": agree.float().mean(0).tolist(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = result["args"]["budgets"]
    runs = result["runs"]
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    for policy in result["args"]["policies"]:
        rows = [runs[f"{policy}/{b}"] for b in budgets]
        style = "o--" if policy.endswith("+adaptive") else "o-"
        axes[0].plot(budgets, [r["top1_agreement"] for r in rows], style, label=policy)
        axes[1].plot(budgets, [r["kl_mean"] for r in rows], style, label=policy)
        axes[2].plot(budgets, [r["first_divergence_median"] for r in rows], style, label=policy)
        curve = runs[f"{policy}/{result['args']['curve_budget']}"]["agreement_by_position"]
        smooth = torch.tensor(curve).unfold(0, 32, 8).mean(-1)
        axes[3].plot(range(16, 16 + 8 * len(smooth), 8), smooth, style[1:], label=policy)
    share = result["budget_share"]
    axes[0].set(xscale="log", xlabel="budget (slots)", ylabel="top-1 agreement", title="Teacher-forced top-1 agreement")
    axes[1].set(xscale="log", yscale="log", xlabel="budget", ylabel="mean KL(full || policy)", title="KL divergence")
    axes[2].set(xscale="log", xlabel="budget", ylabel="tokens", title="Free-running: median first divergence")
    axes[3].set(
        xlabel="generated position",
        ylabel="top-1 agreement",
        title=f"Agreement along the trajectory, budget {result['args']['curve_budget']}",
    )
    for axis in axes[:3]:
        axis.set_xticks(budgets, [f"{b}\n{100 * share[str(b)]:.0f}%" for b in budgets])
        axis.minorticks_off()
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    budgets, runs, share = result["args"]["budgets"], result["runs"], result["budget_share"]
    lines = [
        "| policy | " + " | ".join(f"budget {b} ({100 * share[str(b)]:.0f}%)" for b in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for policy in result["args"]["policies"]:
        cells = []
        for budget in budgets:
            run = runs[f"{policy}/{budget}"]
            divergence = run["first_divergence_median"]
            cells.append(f"{run['top1_agreement']:.3f} / {run['kl_mean']:.3f} / {divergence:.0f}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines.append("\nCells: top-1 agreement / mean KL(full || policy) / median tokens to first free-running divergence.")
    if result.get("sweep"):
        lines.append(f"\nR-KV sweep at budget {result['args']['sweep_budget']}:\n")
        lines.append("| allocation | lam | window | agreement | KL | first divergence |\n|---|---|---|---|---|---|")
        lines += [
            f"| {s.get('allocation', 'uniform')} | {s['lam']} | {s['window']} | {s['top1_agreement']:.3f} "
            f"| {s['kl_mean']:.3f} | {s['first_divergence_median']:.0f} |"
            for s in result["sweep"]
        ]
    shares = {label: run["head_share_range"] for label, run in result["runs"].items() if run.get("head_share_range")}
    if shares:
        lines.append("\nAdaptive runs, slots kept per head at the end as a share of the budget (min - max):\n")
        lines.append(", ".join(f"{label} {low:.2f}-{high:.2f}" for label, (low, high) in shares.items()))
    sanity = result["full_sanity"]
    lines.append(
        f"\nSanity, `full` on the same path: agreement {sanity['top1_agreement']:.4f}, mean KL "
        f"{sanity['kl_mean']:.2e}, first divergences {sanity['first_divergence']} (of {result['args']['new_tokens']})."
    )
    ratios = result["distinct_4gram_ratio"]
    lines.append("\nDistinct-4-gram ratio of each full-cache trajectory: " + ", ".join(f"{r:.2f}" for r in ratios))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model directory or .gguf file (default: bundled SmolLM2)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument(
        "--long-prompt", type=int, default=0, help="instead of chat questions, documents of this many tokens"
    )
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["rkv", "rkv+adaptive", "snapkv", "snapkv+adaptive", "streaming", "h2o", "h2o+adaptive", "random"],
        help="policy names; NAME+adaptive for head-adaptive budgets",
    )
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.6, help="trajectory sampling (the paper's 0.6)")
    parser.add_argument("--top-p", type=float, default=0.95, help="trajectory sampling (the paper's 0.95)")
    parser.add_argument("--sweep-budget", type=int, default=128)
    parser.add_argument("--sweep-lams", type=float, nargs="*", default=[0.02, 0.3, 0.6])
    parser.add_argument("--sweep-windows", type=int, nargs="*", default=[4, 16, 32])
    parser.add_argument("--sweep-allocations", nargs="*", default=["uniform", "adaptive"])
    parser.add_argument("--curve-budget", type=int, default=128)
    parser.add_argument("--out", default="fidelity-smollm2")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from the JSON")
    parser.add_argument("--merge", action="store_true", help="add --policies to the existing --out results")
    args = parser.parse_args(argv)
    if args.plot_only:
        result = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(result))
        plot(result, RESULTS / f"{args.out}.png")
        return 0
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    from tqdm import tqdm

    with torch.no_grad():
        print(f"sampling {args.prompts} trajectories of {args.new_tokens} tokens with the full cache ...", flush=True)
        problems, inputs, sequences, mask, sampler = sample_trajectories(model, tokenizer, args)
        prompt = inputs.input_ids.shape[1]
        generated = sequences[:, prompt:]
        reference = reference_log_probs(model, sequences, mask, prompt)
        lengths = inputs.attention_mask.sum(-1) + args.new_tokens
        share = {str(b): float((b / lengths.float()).mean()) for b in args.budgets}
        tokens_hash = hashlib.sha256(sequences.numpy().tobytes()).hexdigest()
        if args.merge:
            return merge(model, tokenizer, args, sequences, mask, prompt, reference, sampler, tokens_hash)
        result = {
            "args": vars(args),
            "trajectories_sha256": tokens_hash,
            "environment": environment(),
            "prompt_tokens": inputs.attention_mask.sum(-1).tolist(),
            "datasets": [p.dataset for p in problems],
            "budget_share": share,
            "distinct_4gram_ratio": [distinct_4gram_ratio(row.tolist()) for row in generated],
            "runs": {},
        }
        statistics = calibration_file(model, tokenizer) if "triattention-calibrated" in args.policies else None
        patch_model(model, budget=args.budgets[0], buffer=args.buffer)
        # the same machinery without eviction must reproduce the full cache: agreement 1, KL 0, no divergence
        full = RKVConfig(budget=max(args.budgets), buffer=args.buffer, policy="full")
        result["full_sanity"] = summarise(*teacher_forced(model, full, sequences, mask, prompt, reference, sampler))
        jobs = [(p, b) for p in args.policies for b in args.budgets]
        for policy, budget in tqdm(jobs, desc="policies x budgets"):
            config = configured(policy, budget, args.buffer, statistics)
            measured = teacher_forced(model, config, sequences, mask, prompt, reference, sampler)
            result["runs"][f"{policy}/{budget}"] = summarise(*measured)
        settings = [(lam, 8) for lam in args.sweep_lams] + [(0.1, window) for window in args.sweep_windows]
        sweep = [(allocation, *setting) for allocation in args.sweep_allocations for setting in settings]
        result["sweep"] = []
        for allocation, lam, window in tqdm(sweep, desc="R-KV sweep"):
            label = "rkv+adaptive" if allocation == "adaptive" else "rkv"
            config = configured(label, args.sweep_budget, args.buffer, lam=lam, window=window)
            measured = teacher_forced(model, config, sequences, mask, prompt, reference, sampler)
            result["sweep"].append({"allocation": allocation, "lam": lam, "window": window, **summarise(*measured)})
    result["seconds"] = time.perf_counter() - started
    publish(args.out, result, markdown, plot)
    print(f"finished in {result['seconds'] / 60:.1f} min")
    return 0


def merge(model, tokenizer, args, sequences, mask, prompt, reference, sampler, tokens_hash: str) -> int:
    """Add ``args.policies`` to the published run ``args.out``, whose trajectories must be these."""
    from tqdm import tqdm

    path = RESULTS / f"{args.out}.json"
    result = json.loads(path.read_text())
    known = result.get("trajectories_sha256")
    ratios = [distinct_4gram_ratio(row.tolist()) for row in sequences[:, prompt:]]
    if known is None and ratios == result["distinct_4gram_ratio"]:  # an older file, without the hash
        result["trajectories_sha256"] = known = tokens_hash
    if known != tokens_hash:
        raise SystemExit(f"{args.out}: this run sampled other trajectories than the published one; rerun it whole")
    statistics = calibration_file(model, tokenizer) if "triattention-calibrated" in args.policies else None
    patch_model(model, budget=args.budgets[0], buffer=args.buffer)
    sanity = summarise(
        *teacher_forced(
            model,
            RKVConfig(budget=max(args.budgets), buffer=args.buffer, policy="full"),
            sequences,
            mask,
            prompt,
            reference,
            sampler,
        )
    )
    if sanity["first_divergence"] != result["full_sanity"]["first_divergence"]:
        raise SystemExit(f"{args.out}: the full cache does not replay as published; rerun it whole")
    measured_on = environment()["date"]
    for policy in args.policies:
        for budget in tqdm(result["args"]["budgets"], desc=policy):
            config = configured(policy, budget, args.buffer, statistics)
            run = summarise(*teacher_forced(model, config, sequences, mask, prompt, reference, sampler))
            result["runs"][f"{policy}/{budget}"] = {**run, "measured": measured_on}
        if policy not in result["args"]["policies"]:
            result["args"]["policies"].append(policy)
    result.setdefault("merged", []).append({"policies": args.policies, "date": measured_on})
    publish(args.out, result, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
