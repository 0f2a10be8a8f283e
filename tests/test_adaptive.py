"""Head-adaptive budgets (allocation="adaptive"): the allocation rule equals its naive statement, attention over
the pooled slots equals the dense reference, decoding is exact where nothing is evicted and consistent across paths
where it is, and the pool holds exactly the uniform layout's bytes."""

from __future__ import annotations

import naive
import pytest
import torch
import torch._dynamo
from conftest import greedy, padded_prompt, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from rkv_flex import RKVConfig, generate, make_cache, patch_model, unpatch_model
from rkv_flex.kernels import flex_step, masked_sdpa, sdpa_step
from rkv_flex.policies import SlotState
from rkv_flex.pool import PooledSlots
from rkv_flex.scoring import select_adaptive
from rkv_flex.tools.replay import replay

BUDGET, BUFFER, WINDOW = 16, 8, 4
DIM = 8


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    heads=st.integers(1, 4),
    slots=st.integers(6, 20),
    budget=st.integers(3, 10),
    floor=st.integers(2, 6),
    ceiling_extra=st.integers(0, 12),
    invalid=st.sampled_from([0.0, 0.3, 0.7]),
)
def test_allocation_equals_the_naive_rule(seed, heads, slots, budget, floor, ceiling_extra, invalid):
    """The kept set equals a float64 loop of the rule; every head keeps its window and at least its floor, none more
    than the ceiling, and the layer keeps budget x heads slots whenever that many are valid."""
    floor = min(floor, budget)
    ceiling = budget + ceiling_extra
    generator = torch.Generator().manual_seed(seed)
    batch, window_size = 2, 2
    scores = torch.randn(batch, heads, slots, generator=generator, dtype=torch.float64)
    valid = torch.rand(batch, heads, slots, generator=generator) >= invalid
    newest = torch.randint(window_size, slots + 1, (batch, heads, 1), generator=generator)
    index = torch.arange(slots)
    window = (index >= newest - window_size) & (index < newest)
    total = heads * budget
    got = select_adaptive(scores, valid, window, total, floor, ceiling)
    assert torch.equal(got, naive.select_adaptive(scores, valid, window, total, floor, ceiling))
    kept = got.sum(-1)
    assert not (got & ~valid).any()
    assert (got | ~(window & valid)).all()
    assert (kept >= valid.sum(-1).clamp(max=floor)).all() and (kept <= ceiling).all()
    assert torch.equal(got.sum((1, 2)), valid.sum(-1).clamp(max=ceiling).sum(-1).clamp(max=total))


def pool_with_random_segments(seed: int, kv_heads: int, group: int, appended: int, sinks: bool):
    """A pool after one repack of a random per-head selection (variable kept counts), then ``appended`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    batch, ceiling = 2, 2 * BUDGET
    pool = PooledSlots.allocate(
        batch, kv_heads, kv_heads * group, BUDGET, BUFFER, ceiling, WINDOW, DIM, DIM, torch.float32, "cpu", False, sinks
    )
    length = pool.view_length
    source = SlotState(
        keys=torch.randn(batch, kv_heads, length, DIM, generator=generator),
        values=torch.randn(batch, kv_heads, length, DIM, generator=generator),
        valid=torch.ones(batch, kv_heads, length, dtype=torch.bool),
        pos=torch.stack([torch.randperm(200, generator=generator)[:length] for _ in range(batch * kv_heads)]).view(
            batch, kv_heads, length
        ),
        window=torch.zeros(batch, 1, length, dtype=torch.bool),
        queries=pool.queries,
        query_valid=torch.ones(batch, WINDOW, dtype=torch.bool),
    )
    scores = torch.randn(batch, kv_heads, length, generator=generator)
    keep = select_adaptive(scores, source.valid, source.window, kv_heads * BUDGET, WINDOW, ceiling)
    pool.repack(source, keep)
    new_keys = torch.randn(batch, kv_heads, appended, DIM, generator=generator)
    new_pos = (200 + torch.arange(appended)).expand(batch, appended)
    pool.append(new_keys, torch.randn(batch, kv_heads, appended, DIM, generator=generator), new_pos, None, BUDGET)
    return pool, source, keep


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), kv_heads=st.integers(1, 3), group=st.integers(1, 3), appended=st.integers(0, 8))
def test_repack_puts_each_head_s_kept_slots_first_in_order_and_appends_after_them(seed, kv_heads, group, appended):
    pool, source, keep = pool_with_random_segments(seed, kv_heads, group, appended, sinks=False)
    used = torch.full((2,), BUDGET + appended)
    view = pool.heads(used)
    assert torch.equal(pool.kept, keep.sum(-1)) and int(pool.kept.sum(-1).max()) <= kv_heads * BUDGET
    for b in range(2):
        for h in range(kv_heads):
            count = int(keep[b, h].sum())
            assert torch.equal(view.keys[b, h, :count], source.keys[b, h, keep[b, h]])
            assert torch.equal(view.pos[b, h, :count], source.pos[b, h, keep[b, h]])
            assert torch.equal(view.pos[b, h, count : count + appended], 200 + torch.arange(appended))
            assert view.valid[b, h, : count + appended].all() and not view.valid[b, h, count + appended :].any()
    assert int(pool.valid.sum()) == int(keep.sum()) + 2 * kv_heads * appended  # no head wrote over another


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    appended=st.integers(1, 8),
    window=st.sampled_from([None, 30]),
    changes=st.sampled_from(["none", "softcap", "sinks"]),
)
def test_pooled_decoding_equals_the_dense_reference_over_each_head_s_slots(
    seed, kv_heads, group, appended, window, changes
):
    """Flex over the pool (each query head masked to its KV head's segment and visiting only its blocks) and the
    eager SDPA step equal dense SDPA over the per-head view, with sliding windows, soft-capping and sinks. (Eager
    flex here, as in test_attention.py; one compiled shape below, and the decoding tests run it end to end.)"""
    pool, _, _ = pool_with_random_segments(seed, kv_heads, group, appended, sinks=changes == "sinks")
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(2, kv_heads * group, 1, DIM, generator=generator)
    query_pos = torch.full((2, 1), 200 + appended)
    options = {"softcap": 2.0 if changes == "softcap" else None}
    options["sinks"] = torch.randn(kv_heads * group, generator=generator) if changes == "sinks" else None
    view = pool.heads(torch.full((2,), BUDGET + appended))
    want = masked_sdpa(query, view.keys, view.values, view.valid, view.pos, query_pos, 0.4, window, **options)
    sink_slot = pool.capacity - 1 if changes == "sinks" else None
    arguments = (query, pool.keys, pool.values, pool.valid, pool.pos, query_pos, 0.4, window)
    got = flex_step(*arguments, **options, sink_slot=sink_slot, segments=pool.segments)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    eager = sdpa_step(query, pool.keys, pool.values, pool.allowed(), pool.pos, query_pos, 0.4, window, **options)
    torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-5)


def test_compiled_pooled_flex_equals_the_dense_reference_across_several_blocks():
    """Segments of 150-450 slots over a pool of 4 blocks: each head visits only its own blocks and is right."""
    generator = torch.Generator().manual_seed(0)
    kv_heads, group, capacity = 3, 3, 1024
    kept = torch.tensor([[150, 450, 300], [300, 300, 300]])
    pool = PooledSlots.allocate(2, kv_heads, 9, 300, 41, 600, 8, DIM, DIM, torch.float32, "cpu", False, True)
    pool.kept.copy_(kept)
    pool.start.copy_((kept + 41).cumsum(-1) - kept - 41)
    pool.keys.normal_(generator=generator)
    pool.values[:, :, :-1].normal_(generator=generator)  # the sink slot (last) holds no token: zero
    pool.pos.copy_(torch.randperm(capacity, generator=generator)[: pool.capacity])
    pool.valid.copy_(pool.owned().any(1, keepdim=True) & (torch.rand(2, 1, pool.capacity, generator=generator) > 0.2))
    query, query_pos = torch.randn(2, kv_heads * group, 1, DIM, generator=generator), torch.full((2, 1), capacity)
    sinks = torch.randn(9, generator=generator)
    view = pool.heads(torch.full((2,), 300 + 41))
    want = masked_sdpa(query, view.keys, view.values, view.valid, view.pos, query_pos, 0.3, sinks=sinks)
    step = torch.compile(flex_step, fullgraph=True, dynamic=False)
    arguments = (query, pool.keys, pool.values, pool.valid, pool.pos, query_pos, 0.3, None)
    got = step(*arguments, sinks=sinks, sink_slot=pool.capacity - 1, segments=pool.segments)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def adaptive(policy: str = "rkv", **options):
    model = tiny_model("llama", 6, 2, seed=1)
    options = dict(budget=BUDGET, buffer=BUFFER, window=WINDOW, policy=policy, allocation="adaptive", **options)
    return patch_model(model, **options)


def test_with_nothing_evicted_adaptive_decodes_like_stock():
    ids, mask = padded_prompt(2, 9, [0, 3], seed=3)
    tokens, logits = greedy(tiny_model("llama", 6, 2, seed=1), ids, mask, 10)
    got_tokens, got_logits = greedy(adaptive(), ids, mask, 10)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["rkv", "snapkv", "h2o", "random"])
def test_with_eviction_the_flex_path_equals_the_dense_reference(policy):
    """A prompt beyond the slots (staged in chunks), then decoding through several compactions: same tokens, logits
    within 1e-4, on the pooled flex/SDPA paths and on the dense reference over each head's view."""
    ids, mask = padded_prompt(2, 30, [0, 5], seed=4)
    results = []
    for attention in ("flex", "sdpa"):
        model = adaptive(policy, attention=attention, prefill_chunk=12)
        cache = make_cache(model)
        results.append((*greedy(model, ids, mask, 40, cache=cache), cache))
    (tokens, logits, cache), (ref_tokens, ref_logits, _) = results
    assert cache.compactions >= 5
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["rkv", "h2o"])
def test_replay_in_chunks_equals_token_by_token_decoding(policy):
    """Multi-token appends into a pool already split unevenly (teacher-forced replay) give the logits of decoding
    one token per step."""
    model = adaptive(policy)
    ids, mask = padded_prompt(2, 9, [0, 5], seed=2)
    new = 61
    decoded = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    replayed = replay(model, make_cache(model), decoded.sequences[:, :-1], full_mask[:, :-1], 9)
    chunked = torch.cat([logits for _, logits in replayed], dim=1)
    torch.testing.assert_close(chunked, torch.stack(decoded.logits, dim=1), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def compiled_model():
    return adaptive()


def test_compiled_adaptive_decoding_equals_eager_through_many_compactions_without_recompiles(compiled_model):
    model = compiled_model
    ids, mask = padded_prompt(2, 9, [0, 0], seed=5)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=80, min_new_tokens=80, do_sample=False)
    first = generate(model, ids, mask, max_new_tokens=80)
    assert torch.equal(first, eager)
    other, other_mask = padded_prompt(2, 13, [4, 0], seed=6)
    generate(model, other, other_mask, max_new_tokens=40)  # rows out of step: compacts them one at a time
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, cache = generate(model, ids, mask, max_new_tokens=80, return_cache=True)
        generate(model, other, other_mask, max_new_tokens=80)
    assert torch.equal(again, eager)
    assert cache.compactions >= 8
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before  # every graph reused


def test_each_layer_shares_its_budget_out_unevenly_within_floor_and_ceiling(compiled_model):
    ids, mask = padded_prompt(2, 9, [0, 3], seed=7)
    _, cache = generate(compiled_model, ids, mask, max_new_tokens=60, return_cache=True)
    config = cache.config
    uneven = False
    for layer in cache.layers:
        kept = layer.slots.kept
        assert torch.equal(kept.sum(-1), torch.full((2,), 2 * BUDGET))
        assert (kept >= config.floor_slots).all() and (kept <= config.ceiling_slots).all()
        uneven |= bool((kept != BUDGET).any())
    assert uneven


def held_storage(cache) -> dict[str, int]:
    """Bytes of every tensor the cache holds, K/V or other, found by walking its objects (not read off a formula or
    a list of names: a stray temporary kept on any of them counts), each storage once."""
    seen_objects, seen_storage, held = set(), set(), {"kv": 0, "other": 0}

    def walk(obj, name: str = "") -> None:
        if id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storage:
                seen_storage.add(storage.data_ptr())
                held["kv" if name in ("keys", "values") else "other"] += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, name)
        elif type(obj).__module__.startswith("rkv_flex") and hasattr(obj, "__dict__"):
            for attribute, value in vars(obj).items():
                walk(value, attribute)

    walk(cache)
    return held


def test_adaptive_holds_exactly_the_bytes_of_uniform():
    """After decoding through compactions, the pooled layout's K and V storage equals the uniform layout's (and the
    tensor formula 2 layers x K,V x 2 rows x 2 heads x 24 slots x 16 dims x 4 bytes); everything else the cache
    holds (positions, validity, the query ring, counters, segment offsets) differs by the two [B, Hkv] segment
    tensors alone."""
    ids, mask = padded_prompt(2, 9, [0, 3], seed=8)
    held = {}
    for allocation in ("uniform", "adaptive"):
        model = patch_model(tiny_model("llama", 6, 2, seed=1), budget=BUDGET, buffer=BUFFER, allocation=allocation)
        cache = make_cache(model)
        greedy(model, ids, mask, 30, cache=cache)
        held[allocation] = held_storage(cache)
        assert cache.compactions >= 1
        assert cache.kv_bytes == held[allocation]["kv"]
        unpatch_model(model)
    assert held["adaptive"]["kv"] == held["uniform"]["kv"] == 2 * 2 * 2 * 2 * (BUDGET + BUFFER) * 16 * 4
    segments = 2 * 2 * 2 * 2 * 8  # start and kept, [B, Hkv] int64, per layer
    assert held["adaptive"]["other"] == held["uniform"]["other"] + segments


def test_position_blind_policies_refuse_adaptive_allocation():
    for policy in ("streaming", "full"):
        with pytest.raises(ValueError, match="scores that differ between heads"):
            RKVConfig(budget=16, policy=policy, allocation="adaptive")


def test_continuous_batching_refills_rows_of_a_pool_like_fresh_ones(compiled_model):
    """Rows reset and refilled while the others keep their uneven segments: every request as generated alone."""
    from rkv_flex import Engine

    generator = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, 256, (length,), generator=generator).tolist() for length in (5, 30, 11, 19, 3)]
    lengths = [50, 20, 41, 33, 60]
    expected = [
        generate(compiled_model, torch.tensor([prompt]), max_new_tokens=new)[0, len(prompt) :].tolist()
        for prompt, new in zip(prompts, lengths, strict=True)
    ]
    with Engine(compiled_model, batch_size=2) as engine:
        assert engine.generate(prompts, max_new_tokens=lengths) == expected
        assert engine.cache.compactions > 0
