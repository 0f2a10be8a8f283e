"""Hybrid models: rkv_flex compresses the attention layers and leaves linear-attention, Mamba and convolution layers
to transformers' own constant-size state, held for every row (Falcon-H1 runs both in every layer; MiniMax's lightning
layers keep theirs through a cache class of its own). On a tiny config of each type: exact with nothing evicted
(batch 2, left padding, the prompt read in pieces), the compiled loop equal to the eager path with eviction, and the
engine's requests (refilled rows reset their states) equal each request alone. One type compiles with inductor; the
others trace on dynamo's eager backend, since what differs between them is their Python."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import assert_compiled_equals_eager, assert_engine_equals_alone, greedy, padded_prompt, tiny_of_type
from test_architectures import BASE as ARCHITECTURE_BASE

import rkv_flex.compiled
from rkv_flex import Engine, make_cache, patch_model
from rkv_flex.state_layers import StateLayer

BASE = {**ARCHITECTURE_BASE, "num_hidden_layers": 4}
ALTERNATING = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
GATED_DELTA = dict(
    layer_types=ALTERNATING,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
HYBRIDS = {  # model type -> its tiny config beyond BASE: two state layers (or one and a plain MLP), two attention
    "qwen3_5_text": GATED_DELTA,
    "qwen3_5_moe_text": {**GATED_DELTA, **EXPERTS},
    "qwen3_next": {**GATED_DELTA, **EXPERTS},
    "olmo_hybrid": GATED_DELTA,
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], conv_L_cache=3, block_ff_dim=64),
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention", "mamba", "attention"],
        mamba_n_heads=8,
        mamba_d_state=8,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=32,
    ),
    "nemotron_h": dict(
        layer_types=["mamba", "attention", "mlp", "attention"],
        mamba_num_heads=4,
        ssm_state_size=8,
        mamba_head_dim=16,
        n_groups=1,
        chunk_size=8,
    ),
    "falcon_h1": dict(  # every layer: attention and a Mamba-2 mixer side by side
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        mamba_d_conv=4,
        mamba_expand=1,
    ),
    "minimax": dict(layer_types=ALTERNATING, block_size=8, num_local_experts=4, num_experts_per_tok=2),
}
# Stock MiniMax masks a decoding step's padding by layer 0's key count, and its layer 0 is a lightning layer that
# holds no keys (MiniMaxCache().get_mask_sizes(1, 0) is (1, 0) after any prompt): its padded rows attend their padding
STOCK_ATTENDS_PADDING = {"minimax"}
INDUCTOR = "qwen3_5_text"
NEW = 20


def tiny(model_type: str, seed: int):
    return tiny_of_type(model_type, {**BASE, **HYBRIDS[model_type]}, seed)


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_with_nothing_evicted_a_hybrid_decodes_like_stock(model_type):
    model = tiny(model_type, seed=1)
    ids, mask = padded_prompt(2, 9, [0, 0] if model_type in STOCK_ATTENDS_PADDING else [0, 3], seed=1)
    tokens, logits = greedy(model, ids, mask, NEW)
    patch_model(model, budget=56, buffer=8, prefill_chunk=4)  # the prompt in pieces: states carried between them
    cache = make_cache(model)
    got_tokens, got_logits = greedy(model, ids, mask, NEW, cache=cache)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    kinds = model.config.layer_types
    assert [isinstance(layer, StateLayer) for layer in cache.layers] == [kind != "full_attention" for kind in kinds]
    attention = sum(kind in ("full_attention", "hybrid") for kind in kinds)
    assert cache.kv_bytes == attention * (56 + 8) * 2 * 2 * 16 * 2 * 4  # slots x rows x heads x dim x (K, V) x 4 B
    assert cache.state_bytes > 0 or model_type == "nemotron_h"


@pytest.mark.parametrize("model_type", sorted(STOCK_ATTENDS_PADDING))
def test_a_left_padded_row_decodes_as_that_row_alone_where_stock_attends_its_padding(model_type):
    model = tiny(model_type, seed=1)
    ids, mask = padded_prompt(2, 9, [0, 3], seed=1)
    alone, _ = greedy(model, ids[1:, 3:], mask[1:, 3:], NEW)
    stock, _ = greedy(model, ids, mask, NEW)
    assert not torch.equal(stock[1, 9:], alone[0, 6:])  # the stock behaviour this test works around
    patch_model(model, budget=56, buffer=8, prefill_chunk=4)
    got, _ = greedy(model, ids, mask, NEW, cache=make_cache(model))
    assert torch.equal(got[1, 9:], alone[0, 6:])


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_with_eviction_compiled_equals_eager_and_engine_rows_equal_each_request_alone(model_type, monkeypatch):
    torch._dynamo.reset()
    if model_type != INDUCTOR:
        monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    model = patch_model(tiny(model_type, seed=2), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(1, 9, seed=2)
    cache = assert_compiled_equals_eager(model, ids, mask)
    assert cache.compactions >= 2

    assert_engine_equals_alone(model)


def test_adaptive_budgets_over_attention_beside_a_mamba_mixer(monkeypatch):
    """Falcon-H1's layers hold pooled (head-adaptive) slots inside the layer that also holds the Mamba state."""
    torch._dynamo.reset()
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    model = patch_model(tiny("falcon_h1", seed=2), budget=12, buffer=6, window=4, allocation="adaptive")
    cache = assert_compiled_equals_eager(model, *padded_prompt(1, 9, seed=2))
    assert cache.compactions >= 2
    assert_engine_equals_alone(model)


def test_a_layer_kind_rkv_flex_does_not_know_is_refused_by_name_before_any_work():
    model = tiny("qwen3_5_text", seed=0)
    model.config.layer_types = ["linear_attention", "full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"\['chunked_attention'\], which rkv_flex does not know"):
        patch_model(model, budget=16)
    assert model.config._attn_implementation == "sdpa"  # nothing was changed
    model.config.layer_types = ["linear_attention"] * 4
    with pytest.raises(ValueError, match="no attention layer: its state is constant-size already"):
        patch_model(model, budget=16)


def test_a_row_that_finishes_early_keeps_its_states_for_the_next_turn(monkeypatch):
    """Row 0 stops at an end-of-sequence id while row 1 decodes on: transformers' state layers advance every row,
    so the engine restores the rows a step does not feed. Row 0's next turn continues as its conversation alone."""
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    model = patch_model(tiny("qwen3_5_text", seed=5), budget=16, buffer=8, window=4)
    prompts = [padded_prompt(1, n, seed=n)[0][0].tolist() for n in (7, 19)]
    with Engine(model, batch_size=2) as engine:
        eos = engine.generate(prompts, max_new_tokens=NEW)[0][4]
        replies = engine.generate(prompts, max_new_tokens=NEW, eos_token_id=[[eos], []])
        assert len(replies[0]) == 5 and len(replies[1]) == NEW
        follow_ups = [p + r + list(range(10, 30)) for p, r in zip(prompts, replies, strict=True)]
        second = engine.generate(follow_ups, max_new_tokens=10, continue_rows=True)
    for prompt, reply, follow_up, again in zip(prompts, replies, follow_ups, second, strict=True):
        cache = make_cache(model)
        options = dict(do_sample=False, cache=cache)
        model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=len(reply), min_new_tokens=len(reply), **options
        )
        alone = model.generate(input_ids=torch.tensor([follow_up]), max_new_tokens=10, min_new_tokens=10, **options)
        assert alone[0, len(follow_up) :].tolist() == again
