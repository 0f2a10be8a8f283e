"""KV sharing (Gemma 3n, Gemma 4): from a cut-off layer on, layers compute no keys and attend an earlier layer's.
rkv_flex gives such a layer no slots and no selection of its own: it reads its source layer's kept set (in a span,
what the source's queries attended, before the span's compaction). Gemma 4's full layers also have their own head
size and KV heads, and keys that double as values. On a tiny config of each: exact with nothing evicted (batch 2,
left padding, the prompt in pieces), exact for a long prompt compacted at prefill, the compiled loop equal to the
eager path with eviction, and the engine's requests equal each request alone."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import assert_compiled_equals_eager, assert_engine_equals_alone, greedy, padded_prompt, tiny_of_type
from test_architectures import BASE as ARCHITECTURE_BASE
from transformers import AutoConfig, AutoModelForCausalLM

import rkv_flex.attention
import rkv_flex.compiled
from rkv_flex import make_cache, patch_model, unpatch_model
from rkv_flex.cache import RKVLayer, SharedKVLayer

WINDOW = 8
ALTERNATING = dict(
    num_hidden_layers=6,
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention"] * 3,
    num_kv_shared_layers=2,  # layers 4 and 5 read layers 2 and 3
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=256,
)
SHARING = {  # model type -> its tiny config beyond BASE
    "gemma4_text": dict(
        ALTERNATING,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        final_logit_softcapping=30.0,
    ),
    "gemma4_unified_text": dict(ALTERNATING, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True),
    "gemma3n_text": dict(ALTERNATING, altup_num_inputs=2, laurel_rank=4, activation_sparsity_pattern=[0.0] * 6),
}
INDUCTOR = "gemma4_text"
NEW = 20


def tiny(model_type: str, seed: int):
    return tiny_of_type(model_type, {**ARCHITECTURE_BASE, **SHARING[model_type]}, seed)


def held_bytes(model, capacity: int, rows: int) -> int:
    """K and V bytes of the four layers that compute keys: sliding ones hold their window, full ones ``capacity``."""
    text, total = model.config, 0
    for index in range(4):
        layer = text.per_layer_config[index]
        slots = WINDOW if text.layer_types[index] == "sliding_attention" else capacity
        total += 2 * rows * slots * layer.num_key_value_heads * layer.head_dim * 4
    return total


@pytest.mark.parametrize("model_type", sorted(SHARING))
def test_with_nothing_evicted_kv_sharing_decodes_like_stock_and_holds_one_copy(model_type):
    model = tiny(model_type, seed=1)
    ids, mask = padded_prompt(2, 9, [0, 3], seed=1)
    tokens, logits = greedy(model, ids, mask, NEW)
    patch_model(model, budget=56, buffer=8, prefill_chunk=4)
    cache = make_cache(model)
    got_tokens, got_logits = greedy(model, ids, mask, NEW, cache=cache)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    assert [type(layer) for layer in cache.layers] == [RKVLayer] * 4 + [SharedKVLayer] * 2
    assert [layer.source.index for layer in cache.layers[4:]] == [2, 3]
    assert cache.kv_bytes == held_bytes(model, 56 + 8, rows=2)  # the readers hold nothing


def test_gemma4_readers_attend_what_the_source_attended_before_its_prefill_compaction(monkeypatch):
    """A 40-token prompt in one forward, budget 12: the sources keep 12 of it, but within that forward every layer
    attends the whole prompt, so the first token's logits equal stock's. Gemma 4 feeds its KV-sharing layers only
    the last query of a prompt forward; they read the source's staged span, not its compacted slots."""
    model = tiny("gemma4_text", seed=3)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    _, stock_logits = greedy(model, ids, None, 1)
    patch_model(model, budget=12, buffer=6, window=4, prefill_chunk=None)
    queries = []
    attend = rkv_flex.attention.attend_staged

    def spy(layer, span, query, *args):
        queries.append((layer.index, query.shape[2], id(span)))
        return attend(layer, span, query, *args)

    monkeypatch.setattr(rkv_flex.attention, "attend_staged", spy)
    cache = make_cache(model)
    _, logits = greedy(model, ids, None, 1, cache=cache)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-4, atol=1e-4)
    assert cache.planner.used == [12]
    (source,) = [span for index, length, span in queries if (index, length) == (3, 40)]
    assert (3, 1, source) in queries  # the source's span, then its reader's one query over the same span


def test_a_cache_free_forward_of_a_patched_gemma4_is_stock():
    model = tiny("gemma4_text", seed=4)
    ids, mask = padded_prompt(2, 11, [0, 2], seed=4)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        patch_model(model, budget=8)
        patched = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
    torch.testing.assert_close(patched[:, -1], stock[:, -1], rtol=1e-4, atol=1e-4)
    unpatch_model(model)
    assert all(not module._forward_pre_hooks for module in model.modules())  # the readers' hooks are gone


@pytest.mark.parametrize("model_type", sorted(SHARING))
def test_with_eviction_compiled_equals_eager_and_engine_rows_equal_each_request_alone(model_type, monkeypatch):
    torch._dynamo.reset()
    if model_type != INDUCTOR:
        monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    model = patch_model(tiny(model_type, seed=2), budget=12, buffer=6, window=4)
    ids, mask = padded_prompt(1, 9, seed=2)  # (left padding takes slots in model.generate, not in the engine)
    cache = assert_compiled_equals_eager(model, ids, mask)
    assert cache.compactions >= 2
    assert max(cache.planner.used) <= 18

    assert_engine_equals_alone(model)


def test_an_assistant_config_whose_every_layer_reads_another_models_keys_is_refused():
    config = AutoConfig.for_model("gemma4_text", **{**ARCHITECTURE_BASE, **SHARING["gemma4_text"]})
    config.num_kv_shared_layers = config.num_hidden_layers
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="every layer of this gemma4_text reads keys and values another model"):
        patch_model(model, budget=8)


def test_gemma4_attending_later_tokens_is_refused_and_vision_only_bidirectionality_is_not():
    config = dict(ARCHITECTURE_BASE, **SHARING["gemma4_unified_text"])
    bidirectional = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gemma4_unified_text", **config, use_bidirectional_attention="all")
    )
    with pytest.raises(ValueError, match="use_bidirectional_attention='all' attends to later tokens"):
        patch_model(bidirectional, budget=8)
    vision = AutoConfig.for_model("gemma4_unified_text", **config)
    assert vision.use_bidirectional_attention == "vision"  # the text model attends causally
    patch_model(AutoModelForCausalLM.from_config(vision), budget=8)


def test_head_adaptive_budgets_on_gemma4_compiled_equal_eager(monkeypatch):
    """Pooled slots (each head keeps its own count) in the sources; the readers read them through the same view."""
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    model = patch_model(tiny("gemma4_text", seed=6), budget=12, buffer=6, window=4, allocation="adaptive")
    ids, mask = padded_prompt(1, 9, seed=6)
    cache = assert_compiled_equals_eager(model, ids, mask)
    assert cache.compactions >= 2 and not cache.attention[1].slots.uniform
