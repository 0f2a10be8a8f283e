"""Cache bytes a layer layout holds: the stock cache, rkv_flex with every attention layer budgeted, and rkv_flex
with sliding-window layers as rings of their window, at a long generation; a hybrid's linear-attention layers keep
the same constant-size state in all three, a KV-sharing layer (Gemma 3n, Gemma 4) holds nothing in any, and a latent
(MLA) layer holds one latent and rope key per slot, as transformers' own MLA cache does per token. Checked
by one small measured run per layout (the same layers, heads, head sizes and window, with a tiny hidden size, in
fp32).

    python bench/layer_bytes.py [--tokens 32768 --budget 2048 --buffer 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import environment, publish
from transformers import AutoConfig, AutoModelForCausalLM

from rkv_flex import make_cache, patch_model
from rkv_flex.latent import latent_config
from rkv_flex.patch import kv_sources, layer_shapes

LAYOUTS = {  # layout -> (model type, what its released configuration sets beyond transformers' defaults)
    "gpt-oss-20b": ("gpt_oss", dict(num_hidden_layers=24)),
    "qwen3_5 (transformers' default)": ("qwen3_5_text", {}),
    "gemma4 (transformers' default)": ("gemma4_text", {}),
    "gemma3n (transformers' default)": ("gemma3n_text", {}),
    "deepseek-v3/r1 (transformers' default)": ("deepseek_v3", {}),
}
SHRINK = {  # model type -> what shrinks it to a tiny measured model with the same layer layout
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1, vocab_size=512),
    "qwen3_5_text": dict(hidden_size=64, intermediate_size=32, vocab_size=512),
    "gemma4_text": dict(hidden_size=64, intermediate_size=32, vocab_size=512, vocab_size_per_layer_input=512),
    "gemma3n_text": dict(
        hidden_size=64, intermediate_size=32, vocab_size=512, vocab_size_per_layer_input=512, laurel_rank=4
    ),
    "deepseek_v3": dict(  # the latent (512) and rope key (64) widths stay: they are what the cache holds
        hidden_size=64,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        vocab_size=512,
    ),
}
SINKS = {"gpt_oss"}
ATTENTION = ("full_attention", "sliding_attention")


def kinds_of(config) -> list[str]:
    return getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers


def held_slots(config, tokens: int, budget: int, buffer: int, rings: bool) -> dict[str, list[int]]:
    """Slots per model layer (per row and KV head) for the stock cache and rkv_flex: 0 for a layer that holds none
    (a constant-size state, or a KV-sharing layer that reads an earlier layer's)."""
    window, sink = getattr(config, "sliding_window", None), int(config.model_type in SINKS)
    sharing = kv_sources(config, kinds_of(config))
    capacity = budget + buffer
    stock, rkv = [], []
    for index, kind in enumerate(kinds_of(config)):
        if kind not in ATTENTION or index in sharing:
            stock.append(0)
            rkv.append(0)
        elif kind == "sliding_attention":
            stock.append(min(tokens, window))
            rkv.append((window if rings and window <= capacity else capacity) + sink)
        else:
            stock.append(tokens)
            rkv.append(capacity + sink)
    return {"stock": stock, "rkv": rkv}


def state_bytes(config, element: int) -> int:
    """A hybrid's constant-size state per row: each gated-delta layer's convolution window and recurrent state."""
    linear = kinds_of(config).count("linear_attention")
    if not linear:
        return 0
    keys, values = config.linear_num_key_heads * config.linear_key_head_dim, config.linear_num_value_heads
    conv = (2 * keys + values * config.linear_value_head_dim) * config.linear_conv_kernel_dim
    recurrent = values * config.linear_key_head_dim * config.linear_value_head_dim
    return linear * (conv + recurrent) * element


def layout_bytes(config, tokens: int, budget: int, buffer: int, element: int) -> dict:
    kv_heads, head_dims = layer_shapes(config)
    copies = 1 if latent_config(config) is not None else 2  # K and V; an MLA slot is one latent and rope key
    per_slot = [copies * heads * dim * element for heads, dim in zip(kv_heads, head_dims, strict=True)]

    def total(slots: list[int]) -> int:
        return sum(n * size for n, size in zip(slots, per_slot, strict=True)) + states

    rings = held_slots(config, tokens, budget, buffer, rings=True)
    budgeted = held_slots(config, tokens, budget, buffer, rings=False)
    states = state_bytes(config, element)
    return {
        "stock": total(rings["stock"]),
        "rkv_every_layer_budgeted": total(budgeted["rkv"]),
        "rkv_sliding_rings": total(rings["rkv"]),
        "constant_states": states,
    }


def measured(model_type: str, released: dict, tokens: int, budget: int, buffer: int) -> dict:
    """A tiny model of the layout: the bytes its cache holds after ``tokens`` tokens, against the arithmetic."""
    config = AutoConfig.for_model(model_type, **released, **SHRINK[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("eager")
    patch_model(model, budget=budget, buffer=buffer)
    cache = make_cache(model)
    prompt = torch.randint(3, config.vocab_size, (1, 16))
    with torch.no_grad():
        model.generate(
            input_ids=prompt, max_new_tokens=tokens - 16, min_new_tokens=tokens - 16, do_sample=False, cache=cache
        )
    expected = layout_bytes(config, tokens, budget, buffer, element=4)["rkv_sliding_rings"]
    held = cache.kv_bytes + cache.state_bytes
    return {"tokens": tokens, "budget": budget, "buffer": buffer, "held_bytes": held, "arithmetic": expected}


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [
        f"Cache bytes per sequence at {args['tokens']} tokens, budget {args['budget']}, buffer {args['buffer']}, "
        "bf16; a hybrid's constant-size states counted in every column:",
        "",
        "| layout | stock cache | rkv_flex, every layer budgeted | rkv_flex, sliding rings | rkv_flex / stock |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["layouts"].items():
        mib = {key: value / 2**20 for key, value in row["bytes"].items()}
        share = row["bytes"]["rkv_sliding_rings"] / row["bytes"]["stock"]
        lines.append(
            f"| {name} ({row['layers']}) | {mib['stock']:.1f} MiB | {mib['rkv_every_layer_budgeted']:.1f} MiB | "
            f"{mib['rkv_sliding_rings']:.1f} MiB | {share:.1%} |"
        )
    lines.append("\nMeasured on a tiny model of the same layer layout (fp32):")
    for name, row in result["layouts"].items():
        check = row["measured"]
        lines.append(
            f"{name}: {check['held_bytes']} bytes held after {check['tokens']} tokens at budget {check['budget']}, "
            f"buffer {check['buffer']}; arithmetic {check['arithmetic']}"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(result["layouts"])
    kinds = ["stock", "rkv_every_layer_budgeted", "rkv_sliding_rings"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for offset, kind in enumerate(kinds):
        values = [result["layouts"][n]["bytes"][kind] / 2**20 for n in names]
        axis.bar([i + 0.27 * offset for i in range(len(names))], values, width=0.27, label=kind.replace("_", " "))
    axis.set_xticks([i + 0.27 for i in range(len(names))], names)
    axis.set_ylabel("MiB of K and V per sequence")
    axis.set_yscale("log")
    axis.set_title(f"at {result['args']['tokens']} tokens, budget {result['args']['budget']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--buffer", type=int, default=128)
    args = parser.parse_args()
    layouts = {}
    for name, (model_type, released) in LAYOUTS.items():
        config = AutoConfig.for_model(model_type, **released)
        kinds = kinds_of(config)
        counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
        kv_heads, head_dims = layer_shapes(config)
        heads_name = "latent head (latent and rope key)" if latent_config(config) is not None else "KV heads"
        shapes = sorted({(kinds[i], kv_heads[i], head_dims[i]) for i in range(len(kinds)) if kinds[i] in ATTENTION})
        layouts[name] = {
            "layers": ", ".join(f"{n} {kind.replace('_attention', '')}" for kind, n in counts.items())
            + f" (window {getattr(config, 'sliding_window', None)}); "
            + ", ".join(f"{kind.replace('_attention', '')}: {h} {heads_name} of {d}" for kind, h, d in shapes),
            "bytes": layout_bytes(config, args.tokens, args.budget, args.buffer, element=2),
            "measured": measured(model_type, released, tokens=200, budget=64, buffer=32),
        }
    publish("layer-bytes", {"args": vars(args), "environment": environment(), "layouts": layouts}, markdown, plot)


if __name__ == "__main__":
    main()
