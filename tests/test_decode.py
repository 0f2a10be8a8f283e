"""The compiled decoding loop: same tokens as the eager patched generate, no recompiles, sampling, EOS, streaming."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import padded_prompt, tiny_model

from rkv_flex import generate, make_cache, patch_model
from rkv_flex.sampling import Sampling, choose_next

BUDGET, BUFFER, WINDOW = 16, 8, 4


@pytest.fixture(scope="module")
def model():
    """A tiny GQA-3 Llama patched with 24 slots: 60 new tokens run several compactions."""
    return patch_model(tiny_model("llama", 6, 2, seed=1), budget=BUDGET, buffer=BUFFER, window=WINDOW)


def eager(model, ids, mask, new_tokens, **options):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **options,
    )


@pytest.mark.parametrize("prompt,pads", [(9, [0, 3]), (5, [1, 0]), (21, [0, 7])])  # the last is staged at prefill
def test_compiled_greedy_equals_eager_generate(model, prompt, pads):
    ids, mask = padded_prompt(2, prompt, pads, seed=prompt)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=60), eager(model, ids, mask, 60))


def test_no_recompiles_in_steady_state(model):
    """Hundreds of steps across many compactions and two prompt lengths reuse the two graphs as they are."""
    first, first_mask = padded_prompt(2, 7, [0, 2], seed=31)
    second, second_mask = padded_prompt(2, 13, [4, 0], seed=32)
    generate(model, first, first_mask, max_new_tokens=2 * BUFFER)  # warm-up: compiles decode and compaction
    frames_before = torch._dynamo.utils.counters["frames"]["total"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        long_run = generate(model, first, first_mask, max_new_tokens=300)
        other = generate(model, second, second_mask, max_new_tokens=300)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames_before
    assert torch.equal(long_run, eager(model, first, first_mask, 300))
    assert torch.equal(other, eager(model, second, second_mask, 300))


def test_a_new_batch_size_gets_its_own_graphs_and_stays_exact(model):
    ids, mask = padded_prompt(3, 6, [0, 2, 5], seed=41)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=40), eager(model, ids, mask, 40))


def test_eager_loop_equals_compiled_loop(model):
    ids, mask = padded_prompt(2, 8, [0, 1], seed=51)
    assert torch.equal(
        generate(model, ids, mask, max_new_tokens=30, compile=False), generate(model, ids, mask, max_new_tokens=30)
    )


def test_per_sequence_eos_freezes_finished_rows_like_transformers(model):
    ids, mask = padded_prompt(2, 9, [0, 3], seed=61)
    free = eager(model, ids, mask, 40)
    eos = int(free[0, 9 + 5])  # row 0 emits this token at its 6th step
    out = generate(model, ids, mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0, stop_check_every=1)
    reference = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(out, reference)
    first_eos = int((out[0, 9:] == eos).nonzero()[0])
    assert (out[0, 9 + first_eos + 1 :] == 0).all()


def test_streaming_delivers_every_new_token(model):
    class Recorder:
        def __init__(self):
            self.values, self.ended = [], False

        def put(self, value):
            self.values.append(value.clone())

        def end(self):
            self.ended = True

    ids, mask = padded_prompt(1, 6, seed=71)
    streamer = Recorder()
    out = generate(model, ids, mask, max_new_tokens=12, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.values[0], ids)  # the prompt first, as transformers does
    assert torch.equal(torch.cat([v.reshape(-1) for v in streamer.values[1:]]), out[0, 6:])


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    ids, mask = padded_prompt(2, 8, [0, 2], seed=81)
    greedy = generate(model, ids, mask, max_new_tokens=20)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=20, do_sample=True, top_k=1), greedy)
    torch.manual_seed(7)
    first = generate(model, ids, mask, max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(7)
    again = generate(model, ids, mask, max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.9)
    assert torch.equal(first, again)
    assert not torch.equal(first, greedy)


def test_choose_next_samples_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20000, 1)
    counts = torch.bincount(choose_next(logits, Sampling(True, 1.0, 1.0, 3)), minlength=5).float() / 20000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), 0)
    torch.testing.assert_close(counts[:3], expected, atol=0.015, rtol=0)
    assert counts[3:].sum() == 0
    # p = [0.607, 0.223, 0.135, ...]: top-p 0.6 keeps the top token alone, top-p 0.8 the top two
    assert torch.bincount(choose_next(logits, Sampling(True, 1.0, 0.6, 0)), minlength=5)[0] == 20000
    two = torch.bincount(choose_next(logits, Sampling(True, 1.0, 0.8, 0)), minlength=5).float() / 20000
    torch.testing.assert_close(two[:2], torch.tensor([0.607, 0.223]) / 0.830, atol=0.015, rtol=0)
    assert two[2:].sum() == 0


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, top_k=-1), "top_k must be an int >= 0"),
    ],
)
def test_bad_generation_options(model, options, match):
    ids, mask = padded_prompt(1, 4)
    with pytest.raises(ValueError, match=match):
        generate(model, ids, mask, **options)


def test_unpatched_model_and_wrong_device_are_refused(model):
    ids, mask = padded_prompt(1, 4)
    with pytest.raises(ValueError, match="not patched"):
        generate(tiny_model(), ids, mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids is on meta but the model is on cpu"):
        generate(model, ids.to("meta"), None, max_new_tokens=4)


def test_transformers_own_compiled_generate_equals_eager(model):
    """model.generate with transformers' compile path (auto on CUDA; forced here on CPU) compacts on schedule."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers only compiles on accelerators unless told otherwise
    ids, mask = padded_prompt(2, 9, [0, 3], seed=91)
    compiled = eager(model, ids, mask, 60, compile_config=config)
    assert torch.equal(compiled, eager(model, ids, mask, 60))
    assert torch.equal(compiled, generate(model, ids, mask, max_new_tokens=60))


def test_chunked_prefill_is_exact_while_nothing_is_evicted():
    """Chunks that fit the slots see exactly what one prefill sees (left padding longer than a chunk too), on both
    paths, and equal the stock model."""
    ids, mask = padded_prompt(2, 14, [0, 9], seed=101)
    base = tiny_model("llama", 6, 2, seed=1)
    stock = eager(base, ids, mask, 10)
    outputs = []
    for chunk in (None, 4, 5):
        model = patch_model(tiny_model("llama", 6, 2, seed=1), budget=40, buffer=8, window=WINDOW, prefill_chunk=chunk)
        outputs += [eager(model, ids, mask, 10), generate(model, ids, mask, max_new_tokens=10)]
    assert all(torch.equal(out, stock) for out in outputs)


def test_chunked_prefill_with_eviction_keeps_what_the_dense_reference_keeps(model):
    """A prompt three times the slots, fed in chunks smaller and larger than the buffer: the compiled flex path
    keeps the same positions per layer and head as the dense SDPA reference, and decodes the same tokens."""
    ids, mask = padded_prompt(2, 75, [0, 11], seed=102)
    for chunk in (6, 20):
        kept, outputs = [], []
        for attention in ("sdpa", "flex"):
            patched = patch_model(
                tiny_model("llama", 6, 2, seed=1),
                budget=BUDGET,
                buffer=BUFFER,
                window=WINDOW,
                prefill_chunk=chunk,
                attention=attention,
            )
            cache = make_cache(patched)
            outputs.append(eager(patched, ids, mask, 30, cache=cache))
            kept.append([layer.slots.pos.masked_fill(~layer.slots.valid, -1) for layer in cache.layers])
            assert cache.compactions >= 75 // (BUDGET + BUFFER)
        assert torch.equal(outputs[0], outputs[1])
        assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))
        assert torch.equal(generate(patched, ids, mask, max_new_tokens=30), outputs[1])


def test_a_dtype_change_compiles_new_graphs_and_both_stay_right():
    model = patch_model(tiny_model("llama", 4, 2, seed=9), budget=BUDGET, buffer=BUFFER, window=WINDOW)
    ids, mask = padded_prompt(2, 7, [0, 2], seed=9)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=40), eager(model, ids, mask, 40))
    model.to(torch.bfloat16)
    assert generate(model, ids, mask, max_new_tokens=40).shape == (2, 47)  # bf16 accuracy: tests/test_precision.py
    model.to(torch.float32)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=40), eager(model, ids, mask, 40))
