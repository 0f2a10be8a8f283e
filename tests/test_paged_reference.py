"""The naive reference the vLLM plugin is checked against (tests/paged_reference.py) keeps what rkv_flex's
transformers path keeps: the same greedy tokens and, at the end, the same positions in every layer and KV head."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from paged_reference import reference_decode

from rkv_flex import RKVConfig, make_cache, patch_model, unpatch_model


@pytest.mark.parametrize(
    "arch,prompt_length,budget,buffer,chunk",
    [
        ("llama", 9, 12, 6, None),  # the prompt within the capacity
        ("qwen2", 30, 12, 6, None),  # beyond it
        ("qwen3", 23, 16, 4, None),
        ("qwen2", 30, 12, 6, 5),  # in chunks shorter than buffer: compacted first
        ("llama", 50, 12, 6, 8),  # longer: attended with what is held (after the free slots, here), then compacted
    ],
)
def test_the_reference_keeps_what_the_transformers_path_keeps(arch, prompt_length, budget, buffer, chunk):
    model = tiny_model(arch, seed=4)
    prompt = torch.randint(3, 256, (prompt_length,), generator=torch.Generator().manual_seed(4)).tolist()
    config = RKVConfig(budget=budget, buffer=buffer, window=4, policy="rkv", prefill_chunk=chunk)
    pieces = (
        None
        if chunk is None
        else [chunk] * (prompt_length // chunk) + [prompt_length % chunk] * bool(prompt_length % chunk)
    )
    tokens, positions = reference_decode(model, prompt, 40, config, plan_past_end=True, prompt_pieces=pieces)

    patch_model(model, config)
    cache = make_cache(model)
    out = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False, cache=cache
    )
    assert out[0, prompt_length:].tolist() == tokens
    assert cache.compactions >= 3
    for layer, attention in enumerate(cache.attention):
        slots = attention.slots
        held = [slots.pos[0, head][slots.valid[0, head]].sort().values for head in range(slots.pos.shape[1])]
        assert torch.equal(torch.stack(held), positions[layer].sort(dim=1).values)
    unpatch_model(model)
