"""rkv_flex.generate (the compiled loop): every row as it would be generated alone, no recompiles, sampling, EOS,
streaming, transformers' own compiled generate, chunked prefill."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import padded_prompt, tiny_model

from rkv_flex import generate, make_cache, patch_model
from rkv_flex.sampling import RowSampling, SamplingParams, choose

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


def alone(model, ids, mask, new_tokens):
    """The reference: each row through the patched model's eager generate on its own, without its padding."""
    rows = [
        eager(model, row[keep.bool()][None], None, new_tokens)[0, int(keep.sum()) :]
        for row, keep in zip(ids, mask, strict=True)
    ]
    return torch.cat([ids, torch.stack(rows)], dim=1)


@pytest.mark.parametrize("prompt,pads", [(9, [0, 3]), (5, [1, 0]), (30, [0, 7])])  # the last exceeds the slots
def test_compiled_greedy_equals_each_row_decoded_alone(model, prompt, pads):
    ids, mask = padded_prompt(2, prompt, pads, seed=prompt)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=60), alone(model, ids, mask, 60))


def test_without_padding_it_equals_transformers_generate_on_the_batch(model):
    ids, mask = padded_prompt(2, 9, [0, 0], seed=4)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=60), eager(model, ids, mask, 60))


def test_no_recompiles_in_steady_state(model):
    """Hundreds of steps across many compactions and two prompt lengths reuse the graphs as they are."""
    first, first_mask = padded_prompt(2, 7, [0, 2], seed=31)
    second, second_mask = padded_prompt(2, 13, [4, 0], seed=32)
    generate(model, first, first_mask, max_new_tokens=2 * BUFFER)  # warm-up: compiles the step and compaction
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        long_run = generate(model, first, first_mask, max_new_tokens=300)
        other = generate(model, second, second_mask, max_new_tokens=300)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    assert torch.equal(long_run, alone(model, first, first_mask, 300))
    assert torch.equal(other, alone(model, second, second_mask, 300))


def test_a_new_batch_size_gets_its_own_graphs_and_stays_exact(model):
    ids, mask = padded_prompt(3, 6, [0, 2, 5], seed=41)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=40), alone(model, ids, mask, 40))


def test_eager_loop_equals_compiled_loop(model):
    ids, mask = padded_prompt(2, 8, [0, 1], seed=51)
    assert torch.equal(
        generate(model, ids, mask, max_new_tokens=30, compile=False), generate(model, ids, mask, max_new_tokens=30)
    )


def test_per_row_eos_freezes_finished_rows_like_transformers(model):
    ids, mask = padded_prompt(2, 9, [0, 0], seed=61)
    free = eager(model, ids, mask, 40)
    eos = int(free[0, 9 + 5])  # row 0 emits this token by its 6th step
    out = generate(model, ids, mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
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


def test_sampling_is_reproducible_per_seed_and_top_k_1_is_greedy(model):
    ids, mask = padded_prompt(2, 8, [0, 2], seed=81)
    greedy = generate(model, ids, mask, max_new_tokens=20)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=20, do_sample=True, top_k=1), greedy)
    options = dict(max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.9, top_k=0)
    first = generate(model, ids, mask, seed=7, **options)
    assert torch.equal(generate(model, ids, mask, seed=7, **options), first)
    assert not torch.equal(generate(model, ids, mask, seed=8, **options), first)
    assert not torch.equal(first, greedy)
    # a seeded row samples the same tokens alone as in a batch
    alone_row = generate(model, ids[1:, 2:], mask[1:, 2:], seed=7, **options)
    assert torch.equal(alone_row[0, 6:], first[1, 8:])


def test_choose_samples_from_the_filtered_distribution():
    rows = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(rows, 1)

    def shares(**settings):
        sampling = RowSampling.allocate(rows, torch.device("cpu"))
        for row in range(rows):
            sampling.set_row(row, SamplingParams(do_sample=True, seed=row, **settings))
        variant = SamplingParams(do_sample=True, **settings).variant
        return torch.bincount(choose(logits, sampling, torch.zeros(rows, dtype=torch.long), variant), minlength=5)

    counts = shares(top_k=3).float() / rows
    torch.testing.assert_close(counts[:3], torch.softmax(torch.tensor([2.0, 1.0, 0.5]), 0), atol=0.015, rtol=0)
    assert counts[3:].sum() == 0
    # p = [0.607, 0.223, 0.135, ...]: top-p 0.6 keeps the top token alone, top-p 0.8 the top two
    assert shares(top_p=0.6)[0] == rows
    two = shares(top_p=0.8).float() / rows
    torch.testing.assert_close(two[:2], torch.tensor([0.607, 0.223]) / 0.830, atol=0.015, rtol=0)
    assert two[2:].sum() == 0
    plain = shares(temperature=2.0).float() / rows
    torch.testing.assert_close(plain, torch.softmax(logits[0] / 2, 0), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(max_new_tokens=4, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, top_k=-1), ValueError, "top_k must be an int >= 0"),
        (dict(max_new_tokens=4, seed=-1), ValueError, "seed must be an int"),
        (dict(max_new_tokens=4, repetition_penalty=1.2), TypeError, r"generation option\(s\) \['repetition_penalty'\]"),
        (dict(max_new_tokens=[4, 5]), ValueError, "max_new_tokens has 2 values for 1 prompts"),
    ],
)
def test_bad_generation_options(model, options, error, match):
    ids, mask = padded_prompt(1, 4)
    with pytest.raises(error, match=match):
        generate(model, ids, mask, **options)


def test_unpatched_model_wrong_device_and_right_padding_are_refused(model):
    ids, mask = padded_prompt(1, 4)
    with pytest.raises(ValueError, match="not patched"):
        generate(tiny_model(), ids, mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids is on meta but the model is on cpu"):
        generate(model, ids.to("meta"), None, max_new_tokens=4)
    ids, mask = padded_prompt(2, 5)
    mask[0, 4] = 0
    with pytest.raises(ValueError, match="right-padded"):
        generate(model, ids, mask, max_new_tokens=4)


def test_transformers_own_compiled_generate_equals_eager(model):
    """model.generate with transformers' compile path (auto on CUDA; forced here on CPU) compacts on schedule."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers only compiles on accelerators unless told otherwise
    ids, mask = padded_prompt(2, 9, [0, 3], seed=91)
    compiled = eager(model, ids, mask, 60, compile_config=config)
    assert torch.equal(compiled, eager(model, ids, mask, 60))
    unpadded, _ = padded_prompt(2, 9, [0, 0], seed=92)
    assert torch.equal(
        eager(model, unpadded, None, 60, compile_config=config), generate(model, unpadded, None, max_new_tokens=60)
    )


def test_transformers_compiled_generate_reuses_its_cache_and_graphs(model):
    """A patched model.generate keeps one cache per batch, dtype and device: later calls replay the graphs."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    ids, mask = padded_prompt(2, 9, [0, 3], seed=93)
    first = eager(model, ids, mask, 40, compile_config=config)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = eager(model, ids, mask, 40, compile_config=config)
    assert torch.equal(first, again)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before


def test_chunked_prefill_is_exact_while_nothing_is_evicted():
    """Chunks that fit the slots see exactly what one prefill sees (left padding longer than a chunk too), on both
    paths, and equal the stock model."""
    ids, mask = padded_prompt(2, 14, [0, 9], seed=101)
    stock = eager(tiny_model("llama", 6, 2, seed=1), ids, mask, 10)
    for chunk in (None, 4, 5):
        model = patch_model(tiny_model("llama", 6, 2, seed=1), budget=40, buffer=8, window=WINDOW, prefill_chunk=chunk)
        assert torch.equal(eager(model, ids, mask, 10), stock)
        assert torch.equal(generate(model, ids, mask, max_new_tokens=10, compile=False), alone(model, ids, mask, 10))


def test_chunked_prefill_with_eviction_keeps_what_the_dense_reference_keeps():
    """A prompt three times the slots, fed in chunks smaller and larger than the buffer: the flex path keeps the
    same positions per layer and head as the dense SDPA reference, and decodes the same tokens."""
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
