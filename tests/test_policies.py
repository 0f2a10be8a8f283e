"""Policies on the shared slot cache: full equals the stock model, H2O accumulates real attention, user scorers."""

from __future__ import annotations

import naive
import pytest
import torch
from conftest import greedy, padded_prompt, tiny_model

from rkv_flex import RKVConfig, SlotState, generate, make_cache, patch_model
from rkv_flex.attention import rkv_attention
from rkv_flex.cache import LayerSpec, RKVCache
from rkv_flex.forward import positions_from_mask
from rkv_flex.masks import dense_slot_mask


def test_full_policy_is_token_identical_to_the_stock_model_and_grows():
    model = tiny_model("llama", 6, 2, seed=4)
    ids, mask = padded_prompt(2, 7, [0, 2], seed=4)
    stock_tokens, stock_logits = greedy(model, ids, mask, 40)
    patch_model(model, budget=8, buffer=4, policy="full", attention="sdpa")  # 12 slots: must grow to hold 47
    cache = make_cache(model)
    tokens, logits = greedy(model, ids, mask, 40, cache=cache)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-4, atol=1e-4)
    assert cache.compactions == 0 and cache.capacity >= 7 + 39


def test_full_policy_in_the_compiled_loop_is_token_identical_to_the_stock_model():
    model = tiny_model("llama", 6, 2, seed=4)
    ids, mask = padded_prompt(2, 7, [0, 2], seed=4)
    stock_tokens, _ = greedy(model, ids, mask, 40)
    patch_model(model, budget=8, buffer=4, policy="full")
    assert torch.equal(generate(model, ids, mask, max_new_tokens=40), stock_tokens)


def drive_h2o(config: RKVConfig, lengths: list[int], seed: int = 0):
    """Feed random keys/queries through one H2O layer and its attention; return the cache and the history."""
    cache = RKVCache(config, [LayerSpec(query_group=2)])
    generator = torch.Generator().manual_seed(seed)
    queries, keys, snapshots = [], [], []
    for length in lengths:
        key = torch.randn(1, 2, length, 8, generator=generator)
        query = torch.randn(1, 4, length, 8, generator=generator)
        positions = (sum(k.shape[2] for k in keys) + torch.arange(length))[None]
        kwargs = {"position_ids": positions}
        key_out, value_out = cache.update(key, key, 0, kwargs=kwargs)
        rkv_attention(torch.nn.Module(), query, key_out, value_out, None, scaling=8**-0.5, **kwargs)
        queries.append(query)
        keys.append(key)
        slots = cache.layers[0].slots
        snapshots.append((slots.pos.clone(), slots.valid.clone(), slots.attention_sum.clone()))
    return cache, torch.cat(queries, 2), torch.cat(keys, 2), snapshots


def test_h2o_accumulates_the_attention_every_query_paid_to_each_token():
    """No eviction yet: each slot's H2O score is the attention it received from every query so far, summed over
    the query heads of its KV head (the naive loop over the whole history)."""
    config = RKVConfig(budget=20, buffer=4, window=2, policy="h2o", attention="sdpa")
    cache, queries, keys, _ = drive_h2o(config, [5, 1, 1, 3, 1, 1, 1])
    layer, seen = cache.layers[0].slots, keys.shape[2]
    assert cache.compactions == 0
    positions = torch.arange(seen)
    allowed = dense_slot_mask(torch.ones(1, 2, seen, dtype=torch.bool), positions.expand(1, 2, -1), positions[None])
    reference = naive.received_attention(queries, keys, allowed, 8**-0.5)
    torch.testing.assert_close(layer.attention_sum[:, :, :seen].double(), reference, rtol=1e-5, atol=1e-6)


def test_h2o_keeps_the_heavy_hitters_and_carries_their_sums_through_compaction():
    """The heaviest tokens survive the compaction, each with exactly its sum so far plus what the next query paid
    it (softmax over the kept slots and that query's own token, summed over the KV head's query group)."""
    config = RKVConfig(budget=6, buffer=4, window=2, policy="h2o", compact_prompt=False, attention="sdpa")
    cache, queries, keys, snapshots = drive_h2o(config, [10, 1], seed=1)  # the prompt fits; the next token compacts
    assert cache.compactions == 1
    before_pos, before_sum, before_valid = snapshots[0][0], snapshots[0][2], snapshots[0][1]
    layer = cache.layers[0].slots
    for head in range(2):
        sums = {
            int(p): float(s)
            for p, s, v in zip(before_pos[0, head], before_sum[0, head], before_valid[0, head], strict=True)
            if v
        }
        window = {8, 9}
        heavy = sorted((p for p in sums if p not in window), key=lambda p: -sums[p])[: config.budget - 2]
        held = layer.valid[0, head]
        kept = layer.pos[0, head, held]
        assert set(kept.tolist()) == set(heavy) | window | {10}  # plus the token appended after the compaction
        group = queries[0, 2 * head : 2 * head + 2, 10].double()  # the new token's queries of this KV head
        paid = (group @ keys[0, head, kept].double().T * 8**-0.5).softmax(dim=-1).sum(dim=0)
        expected = torch.tensor([sums.get(int(p), 0.0) for p in kept], dtype=torch.float64) + paid
        torch.testing.assert_close(layer.attention_sum[0, head, held].double(), expected, rtol=1e-5, atol=1e-6)


def test_a_custom_scorer_is_called_and_its_choice_is_honoured():
    calls = []

    def oldest_first(state: SlotState) -> torch.Tensor:
        calls.append(state.keys.shape)
        return -state.pos.float()  # keep the oldest tokens (plus the window)

    model = patch_model(tiny_model("llama", 4, 2, seed=6), budget=10, buffer=4, window=2, policy=oldest_first)
    ids, mask = padded_prompt(1, 6, seed=6)
    cache = make_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=20, do_sample=False)
    assert calls and cache.compactions == len(calls) // 2  # two layers per compaction
    for layer in cache.layers:
        slots = layer.slots
        kept = sorted(slots.pos[0, 0, slots.valid[0, 0]].tolist())
        assert kept[:8] == list(range(8))  # the 8 oldest survive every compaction


@pytest.mark.parametrize(
    "scorer,error,match",
    [
        (lambda state: torch.zeros(3), ValueError, "shape"),
        (lambda state: torch.full(state.valid.shape, float("nan")), ValueError, "NaN"),
        (lambda state: state.pos, TypeError, "floating-point"),
    ],
)
def test_bad_custom_scorers_get_clear_errors(scorer, error, match):
    model = patch_model(tiny_model("llama", 4, 2), budget=10, buffer=4, window=2, policy=scorer)
    ids, mask = padded_prompt(1, 6)
    with pytest.raises(error, match=match):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    with pytest.raises(error, match=match):
        generate(model, ids, mask, max_new_tokens=20)  # the compiled loop compacts user scorers eagerly


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="policy 'h3o' is unknown"):
        patch_model(tiny_model(), budget=16, policy="h3o")


def test_h2o_padding_queries_pay_no_attention():
    """A left-padded row accumulates exactly what the same tokens accumulate without padding."""
    model = patch_model(tiny_model("llama", 4, 2, seed=8), budget=30, buffer=4, policy="h2o", attention="sdpa")
    ids, mask = padded_prompt(2, 9, [0, 3], seed=8)
    ids[1, 3:] = ids[0, :6]
    padded, alone = make_cache(model), make_cache(model)
    model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), cache=padded)  # as generate
    model(input_ids=ids[:1, :6], cache=alone)
    for with_pads, without in zip(padded.layers, alone.layers, strict=True):
        real = with_pads.slots.valid[1]
        assert real.sum() == 6 * 2
        torch.testing.assert_close(
            with_pads.slots.attention_sum[1][real], without.slots.attention_sum[0, :, :6].flatten()
        )
