"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash, Kimi Linear): the latent-space score equals the stock
per-head formulation in float64; with nothing evicted the patched model decodes like stock; with eviction the
compiled loop equals the eager path and the engine each request alone; one latent slot per token is all it holds.
Compiled paths run on dynamo's eager backend, as in test_families.py."""

from __future__ import annotations

from types import SimpleNamespace

import naive
import pytest
import torch
import torch._dynamo
from conftest import assert_compiled_equals_eager, assert_engine_equals_alone, greedy, padded_prompt, tiny_of_type
from hypothesis import given, settings
from hypothesis import strategies as st

import rkv_flex.compiled
from rkv_flex import make_cache, patch_model, unpatch_model
from rkv_flex.latent import absorb_query
from rkv_flex.patch import stock_kv_bytes
from rkv_flex.scoring import importance

RANK, ROPE, NOPE, VALUE = 16, 8, 8, 12
BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=256,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
    kv_lora_rank=RANK,
    q_lora_rank=24,
    qk_nope_head_dim=NOPE,
    qk_rope_head_dim=ROPE,
    v_head_dim=VALUE,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
)
EXPERTS = dict(n_routed_experts=4, n_group=1, topk_group=1, n_shared_experts=1)
FAMILIES = {
    "deepseek_v2": dict(EXPERTS, q_lora_rank=None),  # V2-Lite projects queries directly
    "deepseek_v3": EXPERTS,
    "glm4_moe_lite": EXPERTS,
    "kimi_linear": dict(  # a hybrid: its KDA linear-attention layers keep transformers' state
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_local_experts=4,
        linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4},
    ),
}
NEW = 24


@pytest.fixture(autouse=True)
def traced_on_the_eager_backend(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")


def tiny(model_type: str, seed: int):
    return tiny_of_type(model_type, {**BASE, **FAMILIES[model_type]}, seed)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    slots=st.integers(4, 12),
    kernel=st.sampled_from([1, 3, 7]),
    seed=st.integers(0, 2**31),
)
def test_the_latent_score_equals_the_stock_per_head_keys_in_float64(batch, heads, slots, kernel, seed):
    """Scoring absorbed queries against [latent, rope key] is scoring each head's whole query against its expanded
    key (the max over heads, as for any query group)."""
    generator = torch.Generator().manual_seed(seed)
    module = SimpleNamespace(
        kv_b_proj=torch.nn.Linear(RANK, heads * (NOPE + VALUE), bias=False), qk_nope_head_dim=NOPE, v_head_dim=VALUE
    )
    torch.nn.init.normal_(module.kv_b_proj.weight, std=0.3, generator=generator)
    window = 3
    queries = torch.randn(batch, heads, window, NOPE + ROPE, generator=generator)
    latents = torch.randn(batch, 1, slots, RANK, generator=generator)
    rope_keys = torch.randn(batch, 1, slots, ROPE, generator=generator)
    query_valid = torch.rand(batch, window, generator=generator) > 0.3
    query_valid[:, -1] = True
    candidates = torch.rand(batch, 1, slots, generator=generator) > 0.2
    scaling = 0.2
    got = importance(
        absorb_query(module, queries), query_valid, torch.cat([latents, rope_keys], -1), candidates, kernel, scaling
    )
    key_up = module.kv_b_proj.weight.detach().view(heads, NOPE + VALUE, RANK)[:, :NOPE]
    want = naive.latent_importance(queries, query_valid, latents, rope_keys, key_up, candidates, kernel, scaling)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_with_nothing_evicted_the_patched_model_decodes_like_stock(model_type):
    """Batch 2 with left padding, the prompt also fed in pieces (a span after earlier tokens); then unpatched, the
    model is stock again."""
    model = tiny(model_type, seed=1)
    ids, mask = padded_prompt(2, 11, [0, 3], seed=1)
    tokens, logits = greedy(model, ids, mask, NEW)
    for chunk in (None, 4):
        patch_model(model, budget=56, buffer=8, **({} if chunk is None else {"prefill_chunk": chunk}))
        got_tokens, got_logits = greedy(model, ids, mask, NEW)
        assert torch.equal(got_tokens, tokens)
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
        unpatch_model(model)
    assert not any("expand_kv" in vars(module) for module in model.modules())
    assert torch.equal(greedy(model, ids, mask, NEW)[0], tokens)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_with_eviction_the_compiled_loop_equals_the_eager_path_and_the_engine_each_request_alone(model_type):
    model = patch_model(tiny(model_type, seed=2), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(1, 9, seed=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cache = assert_compiled_equals_eager(model, ids, mask, NEW)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # traced, not a silent eager fallback
    assert cache.compactions >= 2
    for layer in cache.attention:  # one latent head: [latent, rope key] per slot, the value a view of its latent
        assert layer.slots.keys.shape == (1, 1, 18, RANK + ROPE)
        assert layer.slots.values.shape == (1, 1, 18, RANK)
        assert layer.slots.values.data_ptr() == layer.slots.keys.data_ptr()
    assert_engine_equals_alone(model)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "streaming"])
def test_other_policies_score_latents_compiled_as_eager(policy):
    model = patch_model(tiny("deepseek_v3", seed=3), budget=12, buffer=6, window=4, policy=policy)
    ids, mask = padded_prompt(1, 9, seed=3)
    assert assert_compiled_equals_eager(model, ids, mask, NEW).compactions >= 2


def test_a_latent_slot_holds_rank_plus_rope_channels_once():
    model = patch_model(tiny("deepseek_v3", seed=4), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(2, 9, seed=4)
    cache = make_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, cache=cache)
    element = 4  # float32
    assert cache.kv_bytes == BASE["num_hidden_layers"] * 2 * 18 * (RANK + ROPE) * element
    # stock MLA caches the same channels per token, for every token
    assert stock_kv_bytes(model, 1000) == BASE["num_hidden_layers"] * 1000 * (RANK + ROPE) * element


def test_what_latent_layers_cannot_do_is_refused_before_any_work(monkeypatch):
    model = tiny("deepseek_v3", seed=5)
    with monkeypatch.context() as patched:  # an MLA module of another form (no expand_kv after the cache)
        patched.delattr(type(model.model.layers[0].self_attn), "expand_kv")
        with pytest.raises(ValueError, match="does not cache latents and expand them after the cache"):
            patch_model(model, budget=12)
    with pytest.raises(ValueError, match="rotates only its last qk_rope_head_dim channels"):
        patch_model(model, budget=12, policy="triattention")
    with pytest.raises(ValueError, match="a latent \\(MLA\\) layer has one"):
        patch_model(model, budget=12, allocation="adaptive")
    for model_type in ("deepseek_v32", "glm_moe_dsa"):  # MLA with an indexer that caches keys of its own
        fields = {**BASE, **EXPERTS, "index_n_heads": 2, "index_head_dim": 16}
        with pytest.raises(ValueError, match=f"{model_type}.*sparse-attention indexer"):
            patch_model(tiny_of_type(model_type, fields, seed=5), budget=12)
