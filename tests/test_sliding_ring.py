"""Sliding-window layers hold exactly their window as a ring and spend none of the budget: exact against stock
through prompts read in pieces shorter and longer than the window, the ring's contents are the newest tokens of
each row, a window wider than the budgeted slots is scored as before, and the engine's rows equal each alone.
Compiled paths here trace on dynamo's eager backend: test_architectures.py compiles sliding models with inductor."""

from __future__ import annotations

import torch
from conftest import greedy, padded_prompt, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import rkv_flex.compiled
from rkv_flex import Engine, generate, make_cache, patch_model
from rkv_flex.slots import LayerSlots, RingSlots


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.sampled_from([2, 3, 5, 8]),
    length=st.integers(1, 14),
    pad=st.integers(0, 3),
    chunk=st.sampled_from([1, 3, 4, 16]),
    new_tokens=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_rings_decode_like_stock_through_prompt_pieces_of_any_length(window, length, pad, chunk, new_tokens, seed):
    """Nothing evicted from the full layers (budget covers the whole sequence): every token and logit as stock's,
    whatever the pieces the prompt is read in (shorter or longer than the window) and the padding."""
    model = tiny_model("mistral", 4, 2, seed=seed, sliding_window=window)
    ids, mask = padded_prompt(2, length + pad, [0, pad], seed=seed)
    stock = greedy(model, ids, mask, new_tokens)
    patch_model(model, budget=48, buffer=8, prefill_chunk=chunk)
    cache = make_cache(model)
    tokens, logits = greedy(model, ids, mask, new_tokens, cache=cache)
    assert torch.equal(tokens, stock[0])
    torch.testing.assert_close(logits, stock[1], rtol=1e-4, atol=1e-4)
    for layer in cache.layers:
        assert isinstance(layer.slots, RingSlots) and layer.slots.capacity == window
        seen = length + pad + new_tokens - 1  # tokens in each row's stream (the last one is not fed)
        for row, pads in enumerate([0, pad]):
            newest = set(range(max(seen - window, pads), seen))  # stream indices of the newest real tokens
            positions = layer.slots.pos[row, 0][layer.slots.valid[row, 0]].tolist()
            assert sorted(positions) == sorted(index - pads for index in newest)


def test_a_window_wider_than_the_slots_is_scored_like_a_full_layer(monkeypatch):
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    model = patch_model(tiny_model("mistral", 4, 2, seed=1, sliding_window=40), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(1, 9, seed=1)
    cache = make_cache(model)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, cache=cache)
    assert cache.compactions >= 2 and all(type(layer.slots) is LayerSlots for layer in cache.layers)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=30, eos_token_id=[]), eager)


def test_gpt_oss_rings_hold_the_window_and_a_sink_and_the_bytes_add_up():
    """gpt-oss's layout (sliding and full layers alternating, learned sinks): each sliding layer holds window + 1
    slots, each full layer budget + buffer + 1, and the cache's bytes are that arithmetic."""
    config = AutoConfig.for_model(
        "gpt_oss",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=4,
        intermediate_size=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=256,
        sliding_window=8,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("eager")
    patch_model(model, budget=32, buffer=16)
    cache = make_cache(model)
    model.generate(input_ids=torch.randint(3, 256, (1, 20)), max_new_tokens=40, do_sample=False, cache=cache)
    held = [layer.slots.capacity for layer in cache.layers]
    assert held == [9 if kind == "sliding_attention" else 49 for kind in config.layer_types]
    assert cache.kv_bytes == sum(held) * 2 * 16 * 2 * 4  # slots x KV heads x head dim x (K, V) x fp32
    assert cache.compactions >= 1


def test_engine_rows_with_sliding_layers_equal_each_request_alone(monkeypatch):
    """Ministral's alternating layers: rings and budgeted slots in one compiled step; refilled rows reset both."""
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    config = AutoConfig.for_model(
        "ministral",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        initializer_range=0.1,
        pad_token_id=0,
    )
    torch.manual_seed(3)
    model = patch_model(AutoModelForCausalLM.from_config(config).eval(), budget=12, buffer=6, window=4)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (4, 25, 9, 31, 2)]
    lengths = [30, 7, 22, 12, 16]
    alone = [
        generate(model, torch.tensor([p]), max_new_tokens=n, eos_token_id=[])[0, len(p) :].tolist()
        for p, n in zip(prompts, lengths, strict=True)
    ]
    with Engine(model, batch_size=2) as engine:
        assert engine.generate(prompts, max_new_tokens=lengths, eos_token_id=[]) == alone
        assert isinstance(engine.cache.layers[0].slots, RingSlots) and engine.cache.compactions > 0
