"""Every bad input gets a clear error naming the problem, before any work starts."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_prompt, tiny_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from rkv_flex import RKVConfig, make_cache, patch_model, unpatch_model
from rkv_flex.policies import check_scores


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(budget=0), ValueError, "budget must be >= 1"),
        (dict(budget=-5), ValueError, "budget must be >= 1"),
        (dict(budget=2.5), TypeError, "budget must be an int"),
        (dict(budget=True), TypeError, "budget must be an int"),
        (dict(budget=64, buffer=0), ValueError, "buffer must be >= 1"),
        (dict(budget=64, window=0), ValueError, "window must be >= 1"),
        (dict(budget=4, window=8), ValueError, r"budget \(4\) must be >= RKVConfig.window \(8\)"),
        (dict(budget=64, lam=1.5), ValueError, r"lam must be in \[0, 1\]"),
        (dict(budget=64, lam=-0.1), ValueError, r"lam must be in \[0, 1\]"),
        (dict(budget=64, kernel=4), ValueError, "kernel must be a positive odd number"),
        (dict(budget=64, kernel=0), ValueError, "kernel must be >= 1"),
        (dict(budget=64, threshold=2.0), ValueError, "threshold"),
        (dict(budget=64, policy="lru"), ValueError, "policy 'lru' is unknown"),
        (dict(budget=64, policy=3), TypeError, "policy must be one of"),
        (dict(budget=64, attention="flash"), ValueError, "attention must be one of"),
        (dict(budget=12, policy="streaming", sinks=8), ValueError, "sinks"),
        (dict(budget=64, compact_prompt="yes"), TypeError, "compact_prompt must be a bool"),
        (dict(budget=64, prefill_chunk=0), ValueError, "prefill_chunk must be >= 1"),
        (dict(budget=64, prefill_chunk=2.0), TypeError, "prefill_chunk must be an int"),
        (dict(budget=64, allocation="paged"), ValueError, "allocation must be one of"),
        (dict(budget=64, allocation="adaptive", head_floor=1.5), ValueError, r"head_floor .* must be in \[0, 1\]"),
        (dict(budget=64, allocation="adaptive", head_ceiling=0.5), ValueError, "head_ceiling .* must be >= 1"),
        (dict(budget=64, head_floor="low"), TypeError, "head_floor must be a number"),
        (dict(budget=64, policy="streaming", allocation="adaptive"), ValueError, "differ between heads"),
    ],
)
def test_bad_config_values(options, error, match):
    with pytest.raises(error, match=match):
        RKVConfig(**options)


def test_config_is_frozen():
    config = RKVConfig(budget=64)
    with pytest.raises(AttributeError):
        config.budget = 8
    assert config.capacity == 64 + 128


def test_unsupported_architecture_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(ValueError, match=r"model type .gpt2.*supported: llama, mistral, qwen2, qwen3, qwen3_moe"):
        patch_model(model, budget=16)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)


def test_patching_twice_and_mixing_config_with_options():
    model = tiny_model()
    patch_model(model, budget=16)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, budget=16)
    unpatch_model(model)
    with pytest.raises(TypeError, match="either an RKVConfig or keyword options"):
        patch_model(model, RKVConfig(budget=16), budget=8)
    with pytest.raises(TypeError, match="budget"):
        patch_model(model)  # budget is required
    assert model.config._attn_implementation == "sdpa"


def test_foreign_cache_is_refused_by_generate_and_forward():
    model = patch_model(tiny_model(), budget=16)
    ids, mask = padded_prompt(1, 5)
    with pytest.raises(TypeError, match="needs an RKVCache, got DynamicCache"):
        model.generate(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache)
    with pytest.raises(RuntimeError, match="can only continue from an RKVCache"):
        model(input_ids=ids[:, :1], cache=cache)


def test_an_rkv_cache_passed_in_is_used():
    model = patch_model(tiny_model(), budget=16, buffer=4, attention="sdpa")
    ids, mask = padded_prompt(1, 5)
    cache = make_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=30, do_sample=False)
    assert cache.get_seq_length() == 5 + 29
    assert cache.compactions == (5 + 29 - 1 - 20) // 4 + 1
    assert cache.capacity == 20


def test_prompt_without_tokens():
    model = patch_model(tiny_model(), budget=16)
    with pytest.raises(ValueError, match="no tokens"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    ids, mask = padded_prompt(2, 4)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"prompt rows \[1\] have no tokens"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_right_padded_prompts_are_refused():
    model = patch_model(tiny_model(), budget=16)
    ids, mask = padded_prompt(2, 5)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match=r"prompt rows \[1\] are right-padded"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_a_cache_that_has_seen_more_than_the_input_is_refused():
    model = patch_model(tiny_model(), budget=16, attention="sdpa")
    ids, mask = padded_prompt(1, 8)
    cache = make_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=4)
    with pytest.raises(ValueError, match="the cache has seen 11 tokens but input_ids holds 8"):
        model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=4)


def test_training_mode_attention_dropout_is_refused():
    model = tiny_model(attention_dropout=0.1)
    patch_model(model, budget=16)
    model.train()
    ids, mask = padded_prompt(1, 4)
    with pytest.raises(NotImplementedError, match="dropout must be 0"):
        model(input_ids=ids, attention_mask=mask, cache=make_cache(model))


def test_cache_implementation_conflicts():
    model = patch_model(tiny_model(), budget=16)
    ids, mask = padded_prompt(1, 4)
    with pytest.raises(ValueError, match="cache_implementation='static' conflicts"):
        model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", max_new_tokens=2)


def test_prompt_too_long_without_prompt_compaction():
    model = patch_model(tiny_model(), budget=8, buffer=4, compact_prompt=False, attention="sdpa")
    ids, mask = padded_prompt(1, 13)
    with pytest.raises(ValueError, match="does not fit the 12 slots"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize(
    "scores,error,match",
    [
        ([1.0], TypeError, "must return a torch.Tensor"),
        (torch.zeros(1, 2, 5), ValueError, "shape"),
        (torch.zeros(1, 2, 6, dtype=torch.long), TypeError, "floating-point"),
        (torch.full((1, 2, 6), float("nan")), ValueError, "NaN or infinite"),
    ],
)
def test_bad_policy_scores(scores, error, match):
    with pytest.raises(error, match=match):
        check_scores(scores, torch.ones(1, 2, 6, dtype=torch.bool))


def test_a_cache_is_not_reused_for_another_batch_size():
    model = patch_model(tiny_model(), budget=16, attention="sdpa")
    cache = make_cache(model)
    ids, mask = padded_prompt(2, 5)
    model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=2)
    ids, mask = padded_prompt(3, 5)
    with pytest.raises(ValueError, match=r"this cache holds batch 2, got batch 3"):
        model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=2)
