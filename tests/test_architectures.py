"""Every supported architecture beyond Llama/Qwen/Mistral, on a tiny random config: exact with nothing evicted,
the compiled loop equal to the eager path with eviction, soft-capping and sinks that matter, refusals."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import padded_prompt
from transformers import AutoConfig, AutoModelForCausalLM

from rkv_flex import generate, make_cache, patch_model
from rkv_flex.patch import ARCHITECTURES

BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=256,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)
TINY = {  # model type -> what its tiny config adds (sliding layers, NoPE layers, experts where the type has them)
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5),
    "phi3": dict(
        sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    ),
    "gpt_oss": dict(sliding_window=5, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        use_sliding_window=True,
        sliding_window=5,
    ),
    "olmo2": dict(),
    "olmo3": dict(num_hidden_layers=4, sliding_window=5),
    "exaone4": dict(num_hidden_layers=4, sliding_window=5, sliding_window_pattern=4),
    "seed_oss": dict(),
    "glm4": dict(),
    "granite": dict(attention_multiplier=0.05, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
    "ministral": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
    "gemma2": dict(
        query_pre_attn_scalar=32, sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=30.0
    ),
    "gemma3_text": dict(num_hidden_layers=4, query_pre_attn_scalar=32, sliding_window=5, sliding_window_pattern=2),
}
EAGER_ONLY = {"gpt_oss", "gemma2"}  # transformers refuses sdpa for them (sinks, soft-capping)
NEW = 24


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Every architecture compiles its own graphs, as a process serving it alone would."""
    torch._dynamo.reset()


def tiny(model_type: str, seed: int = 0, **extra):
    config = AutoConfig.for_model(model_type, **{**BASE, **TINY[model_type], **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("eager" if model_type in EAGER_ONLY else "sdpa")
    model.generation_config.eos_token_id = None  # every run decodes its full length, with no token suppressed
    return model


def greedy(model, ids, mask, **options):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **options,
    )
    return out.sequences, torch.stack(out.logits)


def test_every_architecture_in_the_table_is_tested():
    from test_families import FAMILIES
    from test_hybrids import HYBRIDS
    from test_kv_sharing import SHARING
    from test_latent import FAMILIES as LATENT

    text_models = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}  # AutoModelForCausalLM's own types
    assert set(text_models.values()) <= set(HYBRIDS)
    tested = set(TINY) | set(FAMILIES) | set(HYBRIDS) | set(SHARING) | set(LATENT) | set(text_models)
    tested |= {"llama", "mistral", "qwen2", "qwen3"}
    assert tested == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_with_nothing_evicted_the_patched_model_decodes_like_stock(model_type):
    """Prefill (flex over a left-padded batch) and eager decoding steps: same greedy tokens, logits within 1e-4."""
    model = tiny(model_type, seed=1)
    ids, mask = padded_prompt(2, 9, [0, 3], seed=1)
    tokens, logits = greedy(model, ids, mask)
    patch_model(model, budget=56, buffer=8)
    got_tokens, got_logits = greedy(model, ids, mask)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_with_eviction_the_compiled_loop_equals_the_eager_path_within_capacity(model_type):
    model = patch_model(tiny(model_type, seed=2), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(1, 9, seed=2)
    cache = make_cache(model)
    eager = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        cache=cache,
        pad_token_id=0,
    )
    compiled, compiled_cache = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[], return_cache=True)
    assert torch.equal(compiled, eager)
    assert cache.compactions >= 2
    sink = ARCHITECTURES[model_type].sinks
    for layer in (*cache.layers, *compiled_cache.layers):
        held = layer.sliding_window or 18  # a sliding layer's ring (window 5) holds its window and no more
        assert layer.slots.keys.shape[2] == held + sink  # the slots never grow (gpt-oss: one sink slot more)
        assert int(layer.slots.valid.sum(dim=-1).max()) <= held


@pytest.mark.parametrize("model_type", ["gpt_oss", "gemma2"])
def test_adaptive_budgets_with_sinks_soft_capping_and_sliding_layers(model_type):
    """Pooled slots on the architectures that change scores or masks (sinks, soft-capping, sliding-window layers):
    the eager flex/SDPA path equals the dense reference over each head's view through several compactions, and the
    compiled loop equals the eager path."""
    ids, mask = padded_prompt(1, 9, seed=4)
    options = dict(budget=12, buffer=6, window=4, allocation="adaptive")
    results = []
    for attention in ("flex", "sdpa"):
        model = patch_model(tiny(model_type, seed=4), attention=attention, **options)
        cache = make_cache(model)
        results.append((*greedy(model, ids, mask, cache=cache), cache))
    (tokens, logits, cache), (ref_tokens, ref_logits, _) = results
    assert cache.compactions >= 2
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    model = patch_model(tiny(model_type, seed=4), **options)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[]), tokens)


@pytest.mark.parametrize(
    "model_type,remove",
    [
        ("gemma2", lambda attention: setattr(attention, "attn_logit_softcapping", None)),
        ("gpt_oss", lambda attention: attention.sinks.data.fill_(-1e9)),
    ],
)
def test_soft_capping_and_sinks_are_applied(model_type, remove):
    """The patched model matches stock with the feature; the stock model without it differs, so a patched model
    that dropped the feature would fail the first check."""
    model = tiny(model_type, seed=3)
    ids, mask = padded_prompt(2, 9, [0, 3], seed=3)
    _, with_feature = greedy(model, ids, mask)
    patch_model(model, budget=56, buffer=8)
    _, patched = greedy(model, ids, mask)
    torch.testing.assert_close(patched, with_feature, rtol=1e-4, atol=1e-4)
    stock = tiny(model_type, seed=3)
    for layer in stock.model.layers:
        remove(layer.self_attn)
    _, without_feature = greedy(stock, ids, mask)
    assert (without_feature - with_feature).abs().max() > 1e-2


def test_bidirectional_gemma_is_refused():  # latent attention is served: test_latent.py
    with pytest.raises(ValueError, match="use_bidirectional_attention=True attends to later tokens"):
        patch_model(tiny("gemma3_text", use_bidirectional_attention=True), budget=16)


def test_an_attention_argument_that_changes_the_result_is_refused_by_name():
    from rkv_flex.attention import rkv_attention

    model = tiny("olmo2")
    query = torch.zeros(1, 4, 3, 16)
    with pytest.raises(NotImplementedError, match=r"\['alibi_slopes'\] that olmo2 passes"):
        rkv_attention(model.model.layers[0].self_attn, query, query, query, None, alibi_slopes=torch.ones(4))
