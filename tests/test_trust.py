"""Ordinary use ends neither in a wrong result nor in a surprise error: many models and budgets in one process, no
compile before a short prompt's first token or in the middle of a stream, the public compact(), compiled
multi-token forwards, batch-dependent RoPE in the engine, and memory freed when an engine closes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import padded_prompt, tiny_model
from torch._dynamo.utils import counters
from transformers import Phi3Config, Phi3ForCausalLM

import rkv_flex.compiled
from rkv_flex import Engine, generate, make_cache, patch_model, unpatch_model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_twenty_models_budgets_and_batch_sizes_in_one_process_at_default_limits(monkeypatch):
    """A notebook comparing budgets over a few models: 4 model shapes x 5 (budget, batch) settings, each traced by
    dynamo (graphs of its own, counted: no eager fallback) and equal to its eager twin, with dynamo's default
    recompile limits. What is tested is dynamo's bookkeeping, so the graphs run on dynamo's eager backend (inductor
    would compile 60 graphs for nothing new; the compiled kernels are tested everywhere else)."""
    # nothing here or in the library raised the limit. Compared by value: eager flex_attention (torch's own
    # disable_cache_limit) re-assigns the old value on exit, which torch then no longer counts as "default"
    declared = torch._dynamo.config._config["recompile_limit"].default
    assert torch._dynamo.config.recompile_limit == declared == 8
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", "eager")
    shapes = [(2, 1, 1), (4, 2, 1), (4, 1, 1), (6, 2, 1)]  # (query heads, KV heads, layers)
    settings = [(8, 1), (8, 2), (16, 1), (16, 2), (24, 1)]  # (budget, batch)
    for heads, kv_heads, layers in shapes:
        model = tiny_model("llama", heads, kv_heads, layers=layers, seed=heads + kv_heads)
        for budget, batch in settings:
            patch_model(model, budget=budget, buffer=8, window=4, policy="streaming", attention="sdpa")
            ids, mask = padded_prompt(batch, 6, [0, 2][:batch], seed=budget)
            before = graphs()
            compiled = generate(model, ids, mask, max_new_tokens=16)
            assert graphs() > before  # compiled, not run eagerly
            assert torch.equal(compiled, generate(model, ids, mask, max_new_tokens=16, compile=False))
            unpatch_model(model)


def test_a_prompt_within_one_chunk_compiles_nothing_before_its_first_token():
    """A prompt read in one forward goes into empty slots: causal attention among its own tokens, no kernel to
    compile. Equal to stock where nothing is evicted, and right where the prompt alone overflows the slots."""
    model = tiny_model("llama", 6, 2, seed=7)
    ids, mask = padded_prompt(2, 20, [0, 3], seed=7)
    stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    patch_model(model, budget=32, buffer=8, window=4)
    before = graphs()
    patched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    long_ids, long_mask = padded_prompt(2, 60, [0, 5], seed=8)  # 60 > 40 slots: read in one chunk, then compacted
    overflowing = model.generate(input_ids=long_ids, attention_mask=long_mask, max_new_tokens=6, do_sample=False)
    assert graphs() == before
    assert torch.equal(patched, stock)
    unpatch_model(model)
    patch_model(model, budget=32, buffer=8, window=4, attention="sdpa")
    reference = model.generate(input_ids=long_ids, attention_mask=long_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(overflowing, reference)


def test_a_stream_compiles_nothing_after_its_first_token():
    """Everything decoding needs (the step, the sampling variants in use, the compaction of all rows and of one row)
    is compiled before the first token is handed out, so tokens never stop coming to compile mid-answer."""
    model = patch_model(tiny_model("qwen2", 6, 2, seed=9), budget=16, buffer=8, window=4)
    prompts = [padded_prompt(1, n, seed=n)[0][0].tolist() for n in (5, 11, 7)]
    with Engine(model, batch_size=2) as engine:
        stream = engine.stream(prompts, max_new_tokens=[40, 25, 30], do_sample=[False, True, False], seed=3)
        next(stream)
        after_first = graphs()
        events = list(stream)
        assert engine.cache.compactions >= 3
    assert graphs() == after_first
    assert sum(event.finished for event in events) == 3


def test_compact_leaves_rows_holding_fewer_than_budget_slots_as_they_are():
    """compact() on a row holding fewer than budget tokens kept free slots counted as used; the unmasked decoding
    step then attended to what a reused cache held there before. Now such a row is left as it is."""
    model = patch_model(tiny_model("llama", 6, 2, seed=11), budget=16, buffer=8, window=4)
    cache = make_cache(model)
    first, _ = padded_prompt(1, 30, seed=11)
    model.generate(input_ids=first, max_new_tokens=10, do_sample=False, cache=cache)  # slots full of old keys
    cache.reset()
    ids, _ = padded_prompt(1, 5, seed=12)
    start = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, cache=cache)
    cache.compact()
    continued = model.generate(input_ids=start, max_new_tokens=12, do_sample=False, cache=cache)
    fresh = make_cache(model)
    expected = model.generate(input_ids=ids, max_new_tokens=13, do_sample=False, cache=fresh)
    assert torch.equal(continued, expected)


def test_a_compiled_forward_of_several_tokens_says_what_is_wrong():
    model = patch_model(tiny_model("llama", 4, 2, seed=13), budget=16, buffer=8)
    cache = make_cache(model)
    ids, _ = padded_prompt(1, 6, seed=13)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        step = torch.compile(model, fullgraph=True)
        with pytest.raises(Exception, match="must feed one token per row, got 2"):
            step(input_ids=ids[:, :2], position_ids=torch.tensor([[6, 7]]), cache=cache, use_cache=True)


def longrope_model():
    """A tiny Phi-3 with LongRoPE: past 32 positions transformers switches every row of the batch to the long
    factors, whichever row went past."""
    config = Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=512,
        original_max_position_embeddings=32,
        rope_parameters={
            "rope_type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [4.0] * 8,
            "rope_theta": 10000.0,
        },
        pad_token_id=0,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_longrope_is_refused_past_its_switch_and_in_a_batched_engine_and_exact_within():
    """A LongRoPE model reads with its short factors up to original_max_position_embeddings; past it transformers
    switches every row of the batch to the long factors (and Phi-3's generate reads the whole sequence again), which a
    compressed cache cannot follow: such generations, and an engine of more than one row, are refused before any
    work. Within the switch, the engine (rows refilled) equals stock transformers request by request."""
    model = longrope_model()
    prompts = [padded_prompt(1, n, seed=n)[0][0].tolist() for n in (12, 9)]
    stock = [
        model.generate(input_ids=torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p) :].tolist()
        for p in prompts
    ]
    patch_model(model, budget=8, buffer=8, window=4)  # evicts: compares the cache with itself alone, not stock
    with pytest.raises(ValueError, match="'longrope' RoPE picks its frequencies from the largest position"):
        Engine(model, batch_size=2)
    with pytest.raises(ValueError, match="request 0 reaches 33 tokens, past the 32 positions"):
        generate(model, torch.tensor([prompts[0]]), max_new_tokens=21)
    with pytest.raises(ValueError, match="this generation reaches 40 tokens, past the 32 positions"):
        model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=28)
    alone = [generate(model, torch.tensor([p]), max_new_tokens=20)[0, len(p) :].tolist() for p in prompts]
    with Engine(model, batch_size=1) as engine:  # row refilled: each request as if alone
        assert engine.generate(prompts, max_new_tokens=20) == alone
    unpatch_model(model)
    patch_model(model, budget=32, buffer=8)  # nothing evicted: equal to stock
    with Engine(model, batch_size=1) as engine:
        assert engine.generate(prompts, max_new_tokens=20) == stock


def test_closing_the_first_engine_of_a_fresh_process_frees_its_cache_at_once():
    """Compiling leaves reference cycles that held the engine's cache until a garbage collection; close() (or the
    end of a with block) must free it at once. Run in a fresh process with the collector off."""
    tests = Path(__file__).parent
    script = textwrap.dedent(
        f"""
        import gc, sys, weakref
        gc.disable()
        sys.path.insert(0, {str(tests)!r})
        from conftest import tiny_model
        from rkv_flex import Engine, patch_model
        model = patch_model(tiny_model("qwen2", 6, 2, seed=5), budget=16, buffer=8, window=4)
        engine = Engine(model, batch_size=2)
        engine.generate([[3, 4, 5], [6, 7]], max_new_tokens=30)
        cache, keys = weakref.ref(engine.cache), weakref.ref(engine.cache.layers[0].slots.keys)
        engine.close()
        print(cache() is None and keys() is None)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


def test_transformers_compiled_generate_then_the_engine_then_eager_in_one_process():
    """transformers' own compiled generate leaves the kernel hub's context variable set; an eager forward that then
    calls rkv_flex's compiled span kernel from its middle (a prompt read in pieces) must still close its context
    (clearing the variable around compiled calls broke exactly this): all three paths agree."""
    from transformers import CompileConfig

    model = patch_model(tiny_model("llama", 4, 2, seed=1), budget=16, buffer=8, prefill_chunk=16)
    ids, mask = padded_prompt(1, 40, seed=1)  # read in pieces of 16: the later ones through the compiled span kernel
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    compiled_by_transformers = model.generate(**options, compile_config=compile_config)
    engine = generate(model, ids, mask, max_new_tokens=20, eos_token_id=[])
    eager = model.generate(**options, cache=make_cache(model))
    assert torch.equal(compiled_by_transformers, engine) and torch.equal(engine, eager)
