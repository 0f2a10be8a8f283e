"""Which token positions each KV head of one layer keeps over a generation: R-KV and SnapKV side by side.

The bundled SmolLM2 samples one trajectory for a GSM8K question with the full cache; the trajectory is replayed
(teacher-forced, fill-aligned chunks of --step tokens) under each policy, and after every chunk the positions held
by each KV head of --layer are recorded. The heatmap shows, per head, generation progress (x) against token position
(y): dark where the position is held.

A second figure (``<out>-mask.png``) draws R-KV's retention mask at the end: for each KV head, which key positions
each of the last 64 query positions may attend, evaluated from the flex mask_mod over the slots (the attn-gym
causal rule remapped from slots to positions) and laid out by position.

    python bench/retention.py --layer 15 --budget 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, write_json

from rkv_flex import RKVConfig, patch_model
from rkv_flex.cache import RKVCache
from rkv_flex.patch import layer_specs
from rkv_flex.tools.bundled import chat_prompt, load_model, load_problems
from rkv_flex.tools.replay import replay


def retention(
    model, sequence: torch.Tensor, prompt: int, config: RKVConfig, layer: int, step: int
) -> tuple[torch.Tensor, RKVCache]:
    """Bool [snapshots, kv_heads, positions]: what ``layer`` holds after each chunk; and the cache at the end."""
    cache = RKVCache(config, layer_specs(model))
    total = sequence.shape[1]
    snapshots = []

    def snapshot(cache: RKVCache, fed: int) -> None:
        slots = cache.layers[layer].slots
        held = torch.zeros(slots.valid.shape[1], total, dtype=torch.bool)
        for head in range(held.shape[0]):
            held[head, slots.pos[0, head, slots.valid[0, head]]] = True
        snapshots.append(held)

    for _ in replay(model, cache, sequence, None, prompt, step=step, after_chunk=snapshot):
        pass
    return torch.stack(snapshots), cache


def retention_mask(cache: RKVCache, layer: int, total: int, queries: int = 64) -> torch.Tensor:
    """Bool [kv_heads, queries, total]: the key positions each of the last ``queries`` positions may attend,
    read from the flex mask_mod over the slots and laid out by the position each slot holds."""
    from torch.nn.attention.flex_attention import create_mask

    from rkv_flex.masks import slot_mask_mod

    slots = cache.layers[layer].slots
    kv_heads, capacity = slots.valid.shape[1:]
    group = slots.queries.shape[1] // kv_heads
    query_pos = torch.arange(total - queries, total)[None]
    mask_mod = slot_mask_mod(slots.valid, slots.pos, query_pos, group)
    by_slot = create_mask(mask_mod, 1, kv_heads * group, queries, capacity, device="cpu")[0, ::group]
    by_position = torch.zeros(kv_heads, queries, total, dtype=torch.bool)
    for head in range(kv_heads):
        held = slots.valid[0, head]
        by_position[head][:, slots.pos[0, head, held]] = by_slot[head][:, held]
    return by_position


def plot_mask(mask: torch.Tensor, prompt: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, queries, total = mask.shape
    figure, axes = plt.subplots(heads, 1, figsize=(12, 1.5 * heads + 0.8), squeeze=False)
    for head in range(heads):
        axis = axes[head][0]
        axis.imshow(
            mask[head].float(),
            aspect="auto",
            cmap="Greys",
            interpolation="nearest",
            extent=(0, total, total, total - queries),
        )
        axis.axvline(prompt, color="tab:red", lw=0.6)
        axis.set(ylabel=f"KV head {head}\nquery pos")
    axes[-1][0].set(xlabel="key position (prompt left of the red line)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot(maps: dict[str, torch.Tensor], prompt: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = next(iter(maps.values())).shape[1]
    figure, axes = plt.subplots(heads, len(maps), figsize=(6 * len(maps), 2.6 * heads), squeeze=False)
    for column, (name, held) in enumerate(maps.items()):
        for head in range(heads):
            axis = axes[head][column]
            axis.imshow(held[:, head].T.float(), aspect="auto", origin="lower", cmap="Greys", interpolation="nearest")
            axis.axhline(prompt, color="tab:red", lw=0.6)
            axis.set(title=f"{name}, KV head {head}", xlabel="chunk (generation progress)", ylabel="token position")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--step", type=int, default=16, help="tokens per snapshot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="retention-smollm2")
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    if not 0 <= args.layer < model.config.num_hidden_layers:
        raise SystemExit(f"--layer must be in [0, {model.config.num_hidden_layers})")
    question = load_problems("gsm8k", 1)[0].question
    inputs = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt")
    prompt = inputs.input_ids.shape[1]
    with torch.no_grad():
        torch.manual_seed(args.seed)
        sequence = model.generate(
            **inputs,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=True,
            temperature=0.6,
            top_p=0.95,
        )
        patch_model(model, budget=args.budget, buffer=args.buffer)
        maps, caches = {}, {}
        for policy in ("rkv", "snapkv"):
            config = RKVConfig(budget=args.budget, buffer=args.buffer, policy=policy)
            maps[policy], caches[policy] = retention(model, sequence, prompt, config, args.layer, args.step)
        mask = retention_mask(caches["rkv"], args.layer, sequence.shape[1])
    title = f"SmolLM2-135M layer {args.layer}, budget {args.budget}: positions held (prompt below the red line)"
    plot(maps, prompt, RESULTS / f"{args.out}.png", title)
    compactions = caches["rkv"].compactions
    plot_mask(
        mask,
        prompt,
        RESULTS / f"{args.out}-mask.png",
        f"R-KV retention mask, layer {args.layer}, budget {args.budget}, after {compactions} compactions: the key "
        "positions each of the last 64 queries may attend",
    )
    write_json(
        f"{args.out}.json",
        {
            "args": vars(args),
            "environment": environment(),
            "prompt_tokens": prompt,
            "held_fraction_of_prompt": {
                name: float(held[-1, :, :prompt].float().mean()) for name, held in maps.items()
            },
            "snapshots": {
                name: [[row.nonzero().flatten().tolist() for row in snap] for snap in held]
                for name, held in maps.items()
            },
        },
    )
    print(f"wrote {RESULTS / (args.out + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
