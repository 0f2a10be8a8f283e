"""One rank of a tensor-parallel run (launched by tests/test_tensor_parallel.py with torchrun, gloo on the CPU).

Loads a saved tiny model with transformers' tp_plan, patches it, decodes greedily with eviction on the model's own
generate and on the compiled loop, samples with a seed, and writes what this rank saw to <out>/rank<N>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from rkv_flex import generate, make_cache, patch_model

PROMPT = [[5, 9, 17, 33, 65, 129, 7, 200, 11, 3, 48]]
NEW = 40


def kept(cache) -> list:
    """Per layer, the positions each local KV head holds (-1 where free)."""
    return [layer.slots.pos.masked_fill(~layer.slots.valid, -1).tolist() for layer in cache.layers]


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32
    ).eval()
    rank = dist.get_rank()
    patch_model(model, budget=12, buffer=6, window=4)
    ids = torch.tensor(PROMPT)
    cache = make_cache(model)
    with torch.no_grad():
        eager = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, cache=cache)
    result = {
        "rank": rank,
        "tp_size": model.tp_size,
        "tokens": eager.tolist(),
        "kv_bytes": cache.kv_bytes,
        "kept": kept(cache),
        "compactions": cache.compactions,
    }
    for name, options in (("compiled", {}), ("sampled", {"do_sample": True, "temperature": 1.2, "seed": 3})):
        try:
            result[name] = generate(model, ids, max_new_tokens=NEW, compile=name == "compiled", **options).tolist()
        except Exception as error:  # reported, and judged by the test
            result[f"{name}_error"] = f"{type(error).__name__}: {error}"[:2000]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
