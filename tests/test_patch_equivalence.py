"""With nothing evicted, a patched model decodes exactly like the stock one (sdpa + DynamicCache)."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, padded_prompt, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkv_flex import patch_model, unpatch_model

HEAD_LAYOUTS = [(4, 4), (4, 2), (6, 2), (8, 2), (4, 1)]  # (query heads, kv heads): GQA 1, 2, 3 (not a power of 2), 4


@st.composite
def decoding_cases(draw):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 12))
    pads = [0] + [draw(st.integers(0, length - 1)) for _ in range(batch - 1)]
    return dict(
        arch=draw(st.sampled_from(["llama", "qwen2", "qwen3", "mistral"])),
        heads=draw(st.sampled_from(HEAD_LAYOUTS)),
        batch=batch,
        length=length,
        pads=draw(st.permutations(pads)),
        new_tokens=draw(st.integers(1, 10)),
        seed=draw(st.integers(0, 2**16)),
    )


def assert_same_decoding(stock, patched):
    tokens, logits = stock
    got_tokens, got_logits = patched
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decoding_cases())
def test_sdpa_backend_matches_stock_over_shapes(case):
    heads, kv_heads = case["heads"]
    model = tiny_model(case["arch"], heads, kv_heads, seed=case["seed"])
    ids, mask = padded_prompt(case["batch"], case["length"], case["pads"], seed=case["seed"])
    stock = greedy(model, ids, mask, case["new_tokens"])
    patch_model(model, budget=24, buffer=8, attention="sdpa")
    assert_same_decoding(stock, greedy(model, ids, mask, case["new_tokens"]))
    unpatch_model(model)
    assert_same_decoding(stock, greedy(model, ids, mask, case["new_tokens"]))


# Compiled flex: one graph per head layout (batch and capacity fixed), so only a few compiles.
@pytest.mark.parametrize("arch,heads", [("llama", (4, 4)), ("qwen2", (4, 2)), ("llama", (6, 2)), ("qwen3", (8, 2))])
def test_flex_backend_matches_stock(arch, heads):
    model = tiny_model(arch, *heads, seed=3)
    ids, mask = padded_prompt(2, 9, [0, 4], seed=3)
    stock = greedy(model, ids, mask, 12)
    patch_model(model, budget=24, buffer=8)
    assert_same_decoding(stock, greedy(model, ids, mask, 12))
    unpatch_model(model)
    assert_same_decoding(stock, greedy(model, ids, mask, 12))


def test_sampling_matches_stock_with_the_same_seed():
    model = tiny_model("llama", 6, 2, seed=5)
    ids, mask = padded_prompt(2, 7, [2, 0], seed=5)

    def sample():
        torch.manual_seed(1234)
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95
        )

    stock = sample()
    patch_model(model, budget=24, buffer=8)
    assert torch.equal(sample(), stock)


def test_sliding_window_layers_match_stock():
    model = tiny_model("mistral", 4, 2, seed=7, sliding_window=5)
    ids, mask = padded_prompt(2, 8, [0, 3], seed=7)
    stock = greedy(model, ids, mask, 10)
    patch_model(model, budget=24, buffer=8)
    assert_same_decoding(stock, greedy(model, ids, mask, 10))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.sampled_from(HEAD_LAYOUTS),
    length=st.integers(1, 30),
    new_tokens=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_the_default_eager_step_at_batch_one_matches_stock(heads, length, new_tokens, seed):
    """The one-line path's own decoding step: batch 1, no padding, default settings. Every step takes SDPA over
    the used slots with no mask at all (the host knows they are exactly the valid ones): tokens and logits as
    stock's, and the unmasked path is really the one taken."""
    import rkv_flex.attention as attention

    model = tiny_model("llama", *heads, seed=seed)
    ids, mask = padded_prompt(1, length, seed=seed)
    stock = greedy(model, ids, mask, new_tokens)
    patch_model(model, budget=32, buffer=16)
    prefixes = []
    real_step = attention.sdpa_step

    def spy(*args, prefix=None, **kwargs):
        prefixes.append(prefix)
        return real_step(*args, prefix=prefix, **kwargs)

    attention.sdpa_step = spy
    try:
        assert_same_decoding(stock, greedy(model, ids, mask, new_tokens))
    finally:
        attention.sdpa_step = real_step
    steps = new_tokens - 1 + (length == 1)  # a one-token prompt is read as a decoding step too
    assert len(prefixes) == 2 * steps  # two layers
    assert all(prefix is not None for prefix in prefixes)


def test_cache_free_forward_matches_stock():
    model = tiny_model("qwen2", 6, 2, seed=11)
    ids, mask = padded_prompt(3, 10, [0, 2, 5], seed=11)
    stock = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, budget=24, buffer=8)
    patched = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(patched[real], stock[real], rtol=1e-5, atol=1e-5)


def attention_implementations(model) -> dict[str, str]:
    return {name: m.config._attn_implementation for name, m in model.named_modules() if hasattr(m, "config")}


def test_unpatch_restores_the_model_exactly():
    """Every attribute is the same object again, every module's attention implementation and generate are stock,
    and the model computes exactly what it computed before (logits and generated tokens)."""
    model = tiny_model("llama", 4, 2)
    ids, mask = padded_prompt(2, 7, [0, 2], seed=3)
    logits, tokens = model(input_ids=ids, attention_mask=mask).logits, greedy(model, ids, mask, 5)[0]
    attributes = dict(model.__dict__)
    implementations = attention_implementations(model)
    patch_model(model, budget=16)
    assert model.config._attn_implementation == "rkv_flex" and "generate" in model.__dict__
    unpatch_model(model)
    assert model.__dict__.keys() == attributes.keys()
    assert all(model.__dict__[name] is value for name, value in attributes.items())
    assert {
        n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")
    } == implementations
    assert type(model).generate is model.generate.__func__
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    assert torch.equal(greedy(model, ids, mask, 5)[0], tokens)


def test_beam_search_with_eviction_scores_each_beam_as_its_own_cache_would():
    """Beams trade places at every step (reorder_cache) while their slots are compacted. Each returned beam's score
    must equal the log-probability of its tokens decoded alone, teacher-forced on the same compaction schedule:
    a beam that read another beam's slots after a reorder would score differently."""
    from conftest import teacher_forced

    from rkv_flex import make_cache

    model = patch_model(tiny_model("llama", 4, 2, seed=1), budget=10, buffer=4, window=2, attention="sdpa")
    ids, mask = padded_prompt(1, 6, seed=1)
    cache = make_cache(model)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=30,
        min_new_tokens=30,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
        cache=cache,
    )
    assert cache.compactions >= 6
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        logits, _ = teacher_forced(model, ids, mask, sequence[None])
        logprobs = logits[0].log_softmax(-1).gather(-1, sequence[6:, None])
        torch.testing.assert_close(logprobs.sum(), score, rtol=1e-4, atol=1e-4)


def test_beam_search_matches_stock():
    model = tiny_model("llama", 4, 2, seed=1)
    ids, mask = padded_prompt(2, 6, [0, 2], seed=1)
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    stock = model.generate(**options)
    patch_model(model, budget=24, buffer=8, attention="sdpa")
    assert torch.equal(model.generate(**options), stock)
