"""The engine: continuous batching equals each request generated alone, refilling never recompiles, memory is freed,
generation_config is honoured or refused field by field, concurrent use is safe or refused."""

from __future__ import annotations

import random
import threading
import weakref
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
from conftest import tiny_model
from transformers import GenerationConfig

from rkv_flex import Engine, Policy, SlotState, generate, make_cache, patch_model, unpatch_model
from rkv_flex.compiled import GraphLimitError, compiled

BUDGET, BUFFER, WINDOW = 16, 8, 4


@pytest.fixture(scope="module")
def model():
    return patch_model(tiny_model("qwen2", 6, 2, seed=5), budget=BUDGET, buffer=BUFFER, window=WINDOW)


def workload(count: int, seed: int):
    """Prompts of 3-40 tokens (some beyond the slots) with their own max_new_tokens of 2-70."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, 256) for _ in range(rng.randint(3, 40))] for _ in range(count)]
    return prompts, [rng.randint(2, 70) for _ in prompts]


def alone(model, prompt, new_tokens, **options):
    ids = torch.tensor([prompt])
    return generate(model, ids, max_new_tokens=new_tokens, **options)[0, len(prompt) :].tolist()


def test_continuous_batching_equals_each_request_alone_in_any_queue_order(model):
    prompts, lengths = workload(9, seed=1)
    expected = [alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    order = list(range(len(prompts)))
    random.Random(2).shuffle(order)
    with Engine(model, batch_size=3) as engine:
        assert engine.generate(prompts, max_new_tokens=lengths) == expected
        shuffled = engine.generate([prompts[i] for i in order], max_new_tokens=[lengths[i] for i in order])
        assert shuffled == [expected[i] for i in order]
        assert engine.cache.compactions > 0


def test_free_rows_take_the_longest_request_first_or_the_given_order(model):
    """The queue order decides only when a request runs: a row goes to the largest max_new_tokens first (ties in
    input order) or to the requests as given, and each request's tokens are the same."""
    prompts, _ = workload(5, seed=4)
    lengths = [12, 30, 5, 30, 20]
    with Engine(model, batch_size=1) as engine:  # one row: requests finish in the order they start

        def run(order):
            events = list(engine.stream(prompts, max_new_tokens=lengths, order=order))
            outputs = [[] for _ in prompts]
            for event in events:
                outputs[event.index].extend(event.tokens)
            return [event.index for event in events if event.finished], outputs

        longest, by_length = run("longest-first")
        given, as_given = run("given")
        assert longest == [1, 3, 4, 0, 2]
        assert given == [0, 1, 2, 3, 4]
        assert by_length == as_given
        with pytest.raises(ValueError, match="order must be one of"):
            engine.generate(prompts, order="shortest-first")


def test_per_request_eos_and_sampling_settings(model):
    prompts, _ = workload(4, seed=3)
    free = alone(model, prompts[0], 30)
    eos = free[9]
    options = dict(
        max_new_tokens=30,
        eos_token_id=[[eos], None, None, None],
        do_sample=[False, True, True, False],
        temperature=[1.0, 0.7, 1.3, 1.0],
        top_p=[1.0, 0.9, 1.0, 1.0],
        top_k=0,
        seed=[0, 11, 12, 0],
    )
    with Engine(model, batch_size=2) as engine:
        outputs = engine.generate(prompts, **options)
    assert outputs[0] == free[: free.index(eos) + 1]
    for index, prompt in enumerate(prompts[1:], start=1):
        settings = {name: value[index] if isinstance(value, list) else value for name, value in options.items()}
        new_tokens = settings.pop("max_new_tokens")
        assert outputs[index] == alone(model, prompt, new_tokens, **settings)
    assert outputs[1] != alone(model, prompts[1], 30)  # sampled, not greedy


def test_rows_refilled_many_times_never_recompile(model):
    prompts, lengths = workload(12, seed=4)
    with Engine(model, batch_size=2) as engine:
        engine.generate(prompts[:3], max_new_tokens=lengths[:3])  # warm-up: every graph of this shape
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs = engine.generate(prompts, max_new_tokens=lengths)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    assert outputs == [alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]


def test_close_and_unpatch_free_the_cache_without_a_garbage_collection():
    model = patch_model(tiny_model("qwen2", 6, 2, seed=5), budget=BUDGET, buffer=BUFFER, window=WINDOW)
    engine = Engine(model, batch_size=2, compile=False)
    engine.generate([[3, 4, 5]], max_new_tokens=4)
    cache = weakref.ref(engine.cache)
    keys = weakref.ref(engine.cache.layers[0].slots.keys)
    engine.close()
    assert cache() is None and keys() is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[3, 4]], max_new_tokens=2)
    generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=4, compile=False)
    model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4)
    held = [weakref.ref(e.cache) for e in model.__dict__["_rkv_flex_patch"].engines.values()]
    held += [weakref.ref(c) for c in model.__dict__["_rkv_flex_patch"].caches.values()]
    assert held and all(ref() is not None for ref in held)
    unpatch_model(model)
    assert all(ref() is None for ref in held)
    model_ref = weakref.ref(patch_model(model, budget=BUDGET))
    del model
    assert model_ref() is None  # no reference cycle through the patched generate


def test_two_engines_in_two_threads_do_not_interfere_and_one_engine_is_not_shared(model):
    prompts, lengths = workload(6, seed=6)
    expected = [alone(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    engines = [Engine(model, batch_size=2), Engine(model, batch_size=2)]
    for engine in engines:  # compile outside the threads
        engine.generate(prompts[:1], max_new_tokens=3)
    results = {}

    def work(index):
        results[index] = engines[index].generate(prompts, max_new_tokens=lengths)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] == expected
    stream = engines[0].stream(prompts, max_new_tokens=lengths)
    next(stream)  # holds the engine
    with pytest.raises(RuntimeError, match="already generating"):
        engines[0].generate(prompts, max_new_tokens=lengths)
    stream.close()
    assert engines[0].generate(prompts[:2], max_new_tokens=lengths[:2]) == expected[:2]


@dataclass  # eq=True without frozen: unhashable
class OldestFirst(Policy):
    keep_oldest: bool = True

    def __call__(self, state: SlotState) -> torch.Tensor:
        return -state.pos.float() if self.keep_oldest else state.pos.float()


def test_unhashable_policies_work_in_the_compiled_path():
    scorer_calls = []

    class Scorer:  # a callable with __eq__ and no __hash__
        __hash__ = None

        def __eq__(self, other):
            return self is other

        def __call__(self, state):
            scorer_calls.append(1)
            return -state.pos.float()

    for policy in (OldestFirst(), Scorer()):
        with pytest.raises(TypeError):
            hash(policy)
        patched = patch_model(
            tiny_model("qwen2", 6, 2, seed=5), budget=BUDGET, buffer=BUFFER, window=WINDOW, policy=policy
        )
        prompts, lengths = workload(3, seed=7)
        with Engine(patched, batch_size=2) as engine:
            outputs = engine.generate(prompts, max_new_tokens=lengths)
            assert engine.cache.compactions > 0
        expected = [
            patched.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[
                0, len(p) :
            ]
            for p, n in zip(prompts, lengths, strict=True)
        ]
        assert outputs == [e.tolist() for e in expected]
    assert scorer_calls


def test_generation_config_defaults_are_honoured(model):
    prompts, _ = workload(2, seed=8)
    greedy = [alone(model, p, 12) for p in prompts]
    eos = greedy[0][4]
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.8, top_p=0.9, top_k=20, eos_token_id=eos, max_new_tokens=12, pad_token_id=0
    )
    try:
        with Engine(model, batch_size=2) as engine:
            from_config = engine.generate(prompts)
            explicit = engine.generate(
                prompts, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, eos_token_id=eos, max_new_tokens=12
            )
            overridden = engine.generate(prompts, do_sample=False)
    finally:
        model.generation_config = saved
    assert from_config == explicit
    assert from_config != greedy  # it sampled, as the config says
    assert all(len(out) <= 12 and (out[-1] == eos or len(out) == 12) for out in from_config)
    assert overridden[0] == greedy[0][:5]  # greedy now, stopping at the config's eos


@pytest.mark.parametrize(
    "field,value",
    [
        ("repetition_penalty", 1.3),
        ("num_beams", 2),
        ("no_repeat_ngram_size", 3),
        ("stop_strings", ["done"]),
        ("min_p", 0.1),
        ("min_new_tokens", 5),
        ("num_return_sequences", 2),
        ("bad_words_ids", [[7]]),
    ],
)
def test_unsupported_generation_config_fields_are_refused_by_name(model, field, value):
    saved = model.generation_config
    model.generation_config = GenerationConfig(**{field: value}, do_sample=field == "num_return_sequences")
    try:
        with pytest.raises(ValueError, match=rf"generation_config sets \['{field}'\]"):
            Engine(model, batch_size=1, compile=False).generate([[3, 4, 5]], max_new_tokens=3)
        with pytest.raises(ValueError, match=rf"generation_config sets \['{field}'\]"):
            generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=3)
    finally:
        model.generation_config = saved


def test_a_function_past_the_recompile_limit_raises_a_clear_error():
    double = compiled(lambda x: x * 2)
    limit = torch._dynamo.config.recompile_limit
    with pytest.raises(GraphLimitError, match=r"was compiled \d+ times for one key"):
        for size in range(1, limit + 3):
            double(torch.ones(size))


def test_bad_engine_arguments(model):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        Engine(model, batch_size=0)
    with pytest.raises(ValueError, match="not patched"):
        Engine(tiny_model(), batch_size=1)
    with Engine(model, batch_size=1, compile=False) as engine:
        with pytest.raises(ValueError, match="prompt 1 has no tokens"):
            engine.generate([[3], []], max_new_tokens=2)
        with pytest.raises(TypeError, match="prompts must be a non-empty list"):
            engine.generate([], max_new_tokens=2)


def test_an_eager_engine_step_never_writes_a_row_that_has_finished():
    """Row 0 stops at an end-of-sequence id while row 1 decodes on, eagerly: the host cannot know which rows a step
    feeds (that is decided on the device), so the step writes through the per-row mask, and row 0's next turn
    continues exactly as its conversation alone."""
    model = patch_model(tiny_model("qwen2", 6, 2, seed=7), budget=BUDGET, buffer=BUFFER, window=WINDOW)
    prompts = [[3, 4, 5, 6, 7], [10, 11, 12, 13, 14]]  # in lockstep until row 0 ends
    with Engine(model, batch_size=2, compile=False) as engine:
        eos = engine.generate(prompts, max_new_tokens=12)[0][3]
        replies = engine.generate(prompts, max_new_tokens=12, eos_token_id=[[eos], []])
        assert len(replies[0]) == 4 and len(replies[1]) == 12
        follow_ups = [p + r + [40, 41, 42] for p, r in zip(prompts, replies, strict=True)]
        second = engine.generate(follow_ups, max_new_tokens=6, continue_rows=True)
    cache, prompt = make_cache(model), prompts[0]
    options = dict(do_sample=False, cache=cache)
    model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, **options)
    again = model.generate(input_ids=torch.tensor([follow_ups[0]]), max_new_tokens=6, min_new_tokens=6, **options)
    assert again[0, len(follow_ups[0]) :].tolist() == second[0]
