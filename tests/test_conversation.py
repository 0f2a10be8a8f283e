"""Multi-turn conversations keep their compressed cache, on the model's own generate and on the compiled loop."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_prompt, tiny_model

from rkv_flex import Engine, generate, make_cache, patch_model

NEW = 20


def turns(seed: int, lengths=(9, 6)):
    """A first prompt and the next user message, as token ids [1, n]."""
    first, _ = padded_prompt(1, lengths[0], seed=seed)
    second, _ = padded_prompt(1, lengths[1], seed=seed + 1)
    return first, second


def greedy(model, ids, **options):
    """A mask of ones: without one, transformers takes a generated token equal to the pad id (0 here) for padding in
    the next turn and shifts every later position."""
    mask = torch.ones_like(ids)
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **options
    )


def test_a_reused_cache_with_nothing_evicted_equals_one_generate_over_the_whole_conversation():
    model = patch_model(tiny_model("llama", 6, 2, seed=3), budget=120, buffer=8, attention="sdpa")
    first, second = turns(3)
    cache = make_cache(model)
    turn_one = greedy(model, first, cache=cache)
    conversation = torch.cat([turn_one, second], dim=1)
    turn_two = greedy(model, conversation, cache=cache)
    assert cache.compactions == 0
    assert torch.equal(turn_two, greedy(model, conversation))  # a fresh cache over the whole conversation
    assert cache.get_seq_length() == conversation.shape[1] + NEW - 1


@pytest.mark.parametrize("prefill_chunk", [512, 4])
def test_with_eviction_the_second_turn_stays_within_capacity_and_the_compiled_loop_agrees(prefill_chunk):
    """Turns that overflow the slots: both paths continue from the same compressed state and decode the same
    tokens; the slots never grow."""
    model = patch_model(tiny_model("llama", 6, 2, seed=4), budget=16, buffer=8, window=4, prefill_chunk=prefill_chunk)
    first, second = turns(4, (30, 12))
    cache = make_cache(model)
    eager_one = greedy(model, first, cache=cache)
    eager_two = greedy(model, torch.cat([eager_one, second], dim=1), cache=cache)
    compiled_one, compiled_cache = generate(model, first, max_new_tokens=NEW, return_cache=True)
    assert torch.equal(compiled_one, eager_one)
    compiled_two, same = generate(
        model, torch.cat([compiled_one, second], dim=1), max_new_tokens=NEW, cache=compiled_cache, return_cache=True
    )
    assert same is compiled_cache
    assert torch.equal(compiled_two, eager_two)
    for eager_layer, compiled_layer in zip(cache.layers, compiled_cache.layers, strict=True):
        assert eager_layer.slots.keys.shape[2] == compiled_layer.slots.keys.shape[2] == 24
        held = [layer.slots.pos.masked_fill(~layer.slots.valid, -1) for layer in (eager_layer, compiled_layer)]
        assert torch.equal(*held)
    assert cache.compactions > 2


def test_an_engine_continues_each_rows_conversation():
    model = patch_model(tiny_model("qwen2", 6, 2, seed=5), budget=16, buffer=8, window=4)
    prompts = [padded_prompt(1, n, seed=n)[0][0].tolist() for n in (7, 19)]
    with Engine(model, batch_size=2) as engine:
        replies = engine.generate(prompts, max_new_tokens=NEW)
        follow_ups = [prompt + reply + [5, 6, 7] for prompt, reply in zip(prompts, replies, strict=True)]
        second = engine.generate(follow_ups, max_new_tokens=NEW, continue_rows=True)
    for prompt, reply, again in zip(prompts, replies, second, strict=True):
        cache = make_cache(model)
        one = greedy(model, torch.tensor([prompt]), cache=cache)
        assert one[0, len(prompt) :].tolist() == reply
        two = greedy(model, torch.tensor([prompt + reply + [5, 6, 7]]), cache=cache)
        assert two[0, len(prompt) + len(reply) + 3 :].tolist() == again


@pytest.mark.parametrize("compile", [True, False])
def test_a_row_that_finishes_early_keeps_its_conversation_exactly(compile):
    """Row 0 stops at its end-of-sequence id long before row 1 stops: the steps after it do not feed it (its slots
    and counters stay as they were), so its next turn continues exactly as its conversation alone would."""
    model = patch_model(tiny_model("qwen2", 6, 2, seed=5), budget=16, buffer=8, window=4)
    prompts = [padded_prompt(1, n, seed=n)[0][0].tolist() for n in (7, 19)]
    with Engine(model, batch_size=2, compile=compile) as engine:
        free = engine.generate(prompts, max_new_tokens=NEW)
        eos = free[0][4]
        replies = engine.generate(prompts, max_new_tokens=NEW, eos_token_id=[[eos], []])
        assert len(replies[0]) == 5 and len(replies[1]) == NEW
        follow_ups = [p + r + list(range(10, 30)) for p, r in zip(prompts, replies, strict=True)]
        second = engine.generate(follow_ups, max_new_tokens=10, continue_rows=True)
    for prompt, reply, follow_up, again in zip(prompts, replies, follow_ups, second, strict=True):
        cache = make_cache(model)
        model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=len(reply),
            min_new_tokens=len(reply),
            do_sample=False,
            cache=cache,
        )
        alone = model.generate(
            input_ids=torch.tensor([follow_up]), max_new_tokens=10, min_new_tokens=10, do_sample=False, cache=cache
        )
        assert alone[0, len(follow_up) :].tolist() == again


def test_a_conversation_must_hold_what_the_cache_has_seen():
    model = patch_model(tiny_model("llama", 4, 2, seed=6), budget=16, buffer=8, window=4)
    first, _ = turns(6)
    _, cache = generate(model, first, max_new_tokens=4, return_cache=True, compile=False)
    with pytest.raises(ValueError, match="has seen 12 tokens but its prompt holds 9"):
        generate(model, first, max_new_tokens=4, cache=cache, compile=False)
    with pytest.raises(ValueError, match="one prompt per row"):
        Engine(model, batch_size=1, compile=False, cache=cache).generate([[1], [2]], continue_rows=True)
