"""Teacher-forced replay in fill-aligned chunks equals step-by-step decoding, for every policy."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_prompt, tiny_model

from rkv_flex import RKVConfig, make_cache, patch_model
from rkv_flex.replay import fill_aligned_chunks, replay


def test_chunks_end_exactly_where_the_slots_fill():
    config = RKVConfig(budget=16, buffer=8, window=4)
    assert fill_aligned_chunks(10, 50, config) == [14, 8, 8, 8, 2]  # 24 slots: fill, then every 8 tokens
    assert sum(fill_aligned_chunks(30, 100, config)) == 70  # a staged prompt leaves 16 used
    assert fill_aligned_chunks(30, 100, config)[0] == 8
    assert fill_aligned_chunks(10, 50, config, step=3)[:6] == [3, 3, 3, 3, 2, 3]  # 14 free: 3+3+3+3+2
    assert fill_aligned_chunks(10, 50, config, evicts=False) == [40]


def stepwise_logits(model, cache, ids, mask, prompt):
    """The reference: one forward per token, exactly like decoding."""
    return list(replay(model, cache, ids, mask, prompt, step=1))


@pytest.mark.parametrize("policy", ["rkv", "snapkv", "streaming", "h2o", "random", "full"])
def test_fill_aligned_replay_equals_step_by_step(policy):
    model = patch_model(
        tiny_model("qwen2", 6, 2, seed=2), budget=12, buffer=6, window=3, policy=policy, sinks=2, attention="sdpa"
    )
    ids, mask = padded_prompt(2, 70, [0, 5], seed=2)
    prompt = 9
    chunked = torch.cat([logits for _, logits in replay(model, make_cache(model), ids, mask, prompt)], dim=1)
    stepwise = torch.cat([logits for _, logits in stepwise_logits(model, make_cache(model), ids, mask, prompt)], dim=1)
    assert chunked.shape == stepwise.shape == (2, 70 - prompt + 1, 256)
    torch.testing.assert_close(chunked, stepwise, rtol=1e-4, atol=1e-4)
    assert torch.equal(chunked.argmax(-1), stepwise.argmax(-1))
