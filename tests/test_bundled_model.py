"""End to end on the bundled SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads) with a GSM8K question."""

from __future__ import annotations

import pytest
import torch

from rkv_flex import make_cache, patch_model, unpatch_model
from rkv_flex.tools.bundled import chat_prompt, load_problems

pytestmark = pytest.mark.slow


def test_600_tokens_at_budget_128_stay_within_256_slots_and_match_the_full_cache_until_the_first_compaction(bundled):
    model, tokenizer = bundled
    question = load_problems("gsm8k", 1)[0].question
    inputs = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt")
    prompt = inputs.input_ids.shape[1]
    assert prompt <= 128  # so nothing is evicted before the slots fill
    exact = 256 - prompt + 1  # tokens produced before the first compaction
    stock = model.generate(**inputs, max_new_tokens=exact + 8, do_sample=False)[0, prompt:]

    patch_model(model, budget=128)
    try:
        cache = make_cache(model)
        out = model.generate(**inputs, cache=cache, max_new_tokens=600, min_new_tokens=600, do_sample=False)
    finally:
        unpatch_model(model)
    generated = out[0, prompt:]
    assert generated.shape[0] == 600
    assert torch.equal(generated[:exact], stock[:exact])
    assert cache.compactions == (prompt + 599 - 256 - 1) // 128 + 1
    seen = prompt + 599  # the last new token is never fed back
    assert cache.get_seq_length() == seen
    used = 128 + (seen - 256 - 1) % 128 + 1  # full at 256, then back to 128 every 128 tokens
    window = torch.arange(seen - 8, seen)
    for layer in cache.layers:
        slots = layer.slots
        assert slots.keys.shape[2] == slots.values.shape[2] == 256  # allocated once, never grown
        assert (slots.valid.sum(dim=-1) == used).all()  # every head holds exactly the scheduled count
        held = slots.pos.masked_fill(~slots.valid, -1)
        assert (held[..., :used].diff(dim=-1) > 0).all()  # distinct positions, in order
        assert torch.isin(window, held).all() and (held[..., used - 8 : used] == window).all()
