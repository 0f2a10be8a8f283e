"""Teacher-forced replay in fill-aligned chunks equals real decoding (transformers' generate, one token per step),
for every policy; free-running divergence read off it equals real free-running generation."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_prompt, tiny_model
from transformers import LogitsProcessorList

from rkv_flex import RKVConfig, make_cache, patch_model
from rkv_flex.tools.replay import fill_aligned_chunks, replay
from rkv_flex.tools.shared_noise import SharedNoiseSampler, first_miss


def test_chunks_end_exactly_where_the_slots_fill():
    config = RKVConfig(budget=16, buffer=8, window=4)
    assert fill_aligned_chunks(10, 50, config) == [14, 8, 8, 8, 2]  # 24 slots: fill, then every 8 tokens
    assert sum(fill_aligned_chunks(30, 100, config)) == 70  # a prompt beyond the slots leaves 16 used
    assert fill_aligned_chunks(30, 100, config)[0] == 8
    assert fill_aligned_chunks(10, 50, config, step=3)[:6] == [3, 3, 3, 3, 2, 3]  # 14 free: 3+3+3+3+2
    assert fill_aligned_chunks(10, 50, config, evicts=False) == [40]
    chunked = RKVConfig(budget=16, buffer=8, window=4, prefill_chunk=7)
    # prompt chunks 7, 7, 7, then 7 compacts first (16 + 7 = 23 used), and 2 compacts again: 18 used, 6 free
    assert fill_aligned_chunks(30, 40, chunked) == [6, 4]


@pytest.mark.parametrize("policy", ["rkv", "snapkv", "streaming", "h2o", "random", "full"])
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_fill_aligned_replay_equals_real_decoding(policy, attention):
    """Greedy generate decodes one token per forward and compacts on its own schedule; replaying its output in
    fill-aligned chunks gives the same logits at every generated position."""
    model = patch_model(
        tiny_model("qwen2", 6, 2, seed=2), budget=12, buffer=6, window=3, policy=policy, sinks=2, attention=attention
    )
    ids, mask = padded_prompt(2, 9, [0, 5], seed=2)
    new = 61
    decoded = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        cache=(cache := make_cache(model)),
    )
    assert cache.compactions >= 8 or policy == "full"
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    replayed = replay(model, make_cache(model), decoded.sequences[:, :-1], full_mask[:, :-1], 9)
    chunked = torch.cat([logits for _, logits in replayed], dim=1)
    torch.testing.assert_close(chunked, torch.stack(decoded.logits, dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["rkv", "streaming", "full"])
def test_free_running_divergence_is_the_first_teacher_forced_miss(policy):
    """bench/fidelity.py reads free-running divergence off teacher-forced logits; real free-running agrees."""
    model = tiny_model("llama", 4, 2, seed=3)
    ids, mask = padded_prompt(2, 10, [0, 3], seed=3)
    prompt, new = 10, 60
    sampler = SharedNoiseSampler(prompt, seed=5, temperature=0.6, top_p=0.95)
    sample = dict(max_new_tokens=new, do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    reference = model.generate(input_ids=ids, attention_mask=mask, **sample)
    patch_model(model, budget=12, buffer=6, window=3, policy=policy, sinks=2, attention="sdpa")
    full_mask = torch.cat([mask, torch.ones_like(reference[:, prompt:])], dim=1)
    matches = []
    for start, logits in replay(model, make_cache(model), reference[:, :-1], full_mask[:, :-1], prompt):
        first = start - (prompt - 1)
        drawn = sampler.choose(logits, first)
        matches.append(drawn == reference[:, prompt + first : prompt + first + logits.shape[1]])
    predicted = first_miss(torch.cat(matches, dim=1))
    free = model.generate(input_ids=ids, attention_mask=mask, cache=make_cache(model), **sample)
    observed = first_miss(free[:, prompt:] == reference[:, prompt:])
    assert torch.equal(predicted, observed)
    if policy == "full":
        assert (observed == new).all()
    else:  # evicting this much must change the samples, or the test proves nothing
        assert (observed < new).all()


def test_shared_noise_samples_from_the_warped_distribution():
    sampler = SharedNoiseSampler(0, seed=1, temperature=0.5, top_p=0.95, suppress=[3])
    logits = torch.tensor([[[2.0, 1.0, 0.0, 5.0, -1.0]]]).expand(1, 4000, 5)
    drawn = sampler.choose(logits, 0).flatten()
    assert not (drawn == 3).any()  # suppressed
    warped = (torch.tensor([2.0, 1.0, 0.0, -1.0]) / 0.5).softmax(-1)  # without token 3: .865 .117 .016 .002
    assert set(drawn.tolist()) == {0, 1}  # top-p 0.95 drops the two least likely (.018 <= .05)
    share = (drawn == 0).float().mean()
    assert abs(share - warped[0] / warped[:2].sum()) < 0.03
    torch.testing.assert_close(sampler.noise(7, 2, 5), sampler.noise(7, 2, 5))
    batch = torch.randn(3, 4, 5)
    assert torch.equal(sampler.choose(batch, 2, torch.tensor([0, 2])), sampler.choose(batch, 2)[[0, 2]])
    assert first_miss(torch.tensor([[True, False, True], [True, True, True]])).tolist() == [1, 3]


@pytest.mark.parametrize(("option", "value"), [("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5)])
def test_shared_noise_refuses_bad_sampling_settings(option, value):
    with pytest.raises(ValueError, match=option):
        SharedNoiseSampler(0, **{option: value})
