"""Families whose attention is Llama's (q/k norms, partial RoPE, MoE or other MLPs around it): on a tiny random
config each decodes exactly like stock with nothing evicted, its compiled loop equals its eager path with eviction,
and the engine's requests equal each request alone. The compiled paths run on dynamo's eager backend: what is new
per family is whether its forward traces around the cache (graph breaks, guards), while the inductor kernels behind
it are the same as for the 17 architectures in test_architectures.py and are tested there."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import assert_engine_equals_alone, greedy, padded_prompt, tiny_of_type
from test_architectures import BASE as ARCHITECTURE_BASE
from transformers import AutoConfig

import rkv_flex.compiled
from rkv_flex import generate, make_cache, patch_model

BASE = ARCHITECTURE_BASE
FAMILIES = {  # model type -> what its tiny config sets beyond BASE (experts, q/k norms)
    "glm4_moe": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        use_qk_norm=True,
    ),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2),
    "ernie4_5": dict(),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1),
    "hunyuan_v1_dense": dict(),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, moe_intermediate_size=32),
    "apertus": dict(max_position_embeddings=8192),  # its llama3 RoPE needs room for the original 8192 positions
    "arcee": dict(),
}
NEW = 24


@pytest.fixture(autouse=True)
def traced_on_the_eager_backend(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")


def tiny(model_type: str, seed: int):
    return tiny_of_type(model_type, {**BASE, **FAMILIES[model_type]}, seed)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_with_nothing_evicted_the_patched_model_decodes_like_stock(model_type):
    model = tiny(model_type, seed=1)
    ids, mask = padded_prompt(2, 9, [0, 3], seed=1)
    tokens, logits = greedy(model, ids, mask, NEW)
    patch_model(model, budget=56, buffer=8)
    got_tokens, got_logits = greedy(model, ids, mask, NEW)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_with_eviction_the_compiled_loop_equals_the_eager_path_and_the_engine_each_request_alone(model_type):
    """One row: through model.generate, a left-padded batch's padding holds slots until a compaction, so only a
    row without padding compacts when the same row decoded by rkv_flex.generate does (docs/method.md, section 6)."""
    model = patch_model(tiny(model_type, seed=2), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(1, 9, seed=2)
    cache = make_cache(model)
    eager = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, cache=cache
    )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # traced, not a silent eager fallback
    assert torch.equal(compiled, eager)
    assert cache.compactions >= 2
    for layer in cache.layers:
        assert layer.slots.keys.shape[2] == 18
        assert int(layer.slots.valid.sum(dim=-1).max()) <= 18

    assert_engine_equals_alone(model)


def test_the_multimodal_exaone_4_5_is_refused_with_its_text_decoder_named():
    from types import SimpleNamespace

    wrapper = SimpleNamespace(config=AutoConfig.for_model("exaone4_5"))
    with pytest.raises(ValueError, match=r"exaone4_5.*multimodal.*model type exaone4"):
        patch_model(wrapper, budget=16)
