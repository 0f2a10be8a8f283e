"""The vLLM plugin's pure parts, in this environment (no vLLM needed): the physical-length rule both vLLM sides
compute, against rkv_flex's own planner; and compaction inside a paged cache, against rkv_flex's slot compaction of
the same keys."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rkv_flex.config import RKVConfig
from rkv_flex.planner import Planner
from rkv_flex.policies import make_policy
from rkv_flex.slots import LayerSlots
from rkv_flex.vllm_plugin.lengths import blocks_for, held_after, next_step
from rkv_flex.vllm_plugin.pages import compact_slots, read_slots, write_slots


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(4, 40),
    buffer=st.integers(1, 24),
    prompt=st.lists(st.integers(1, 80), min_size=1, max_size=4),
    decode=st.integers(0, 90),
)
def test_the_plugin_holds_what_rkv_flexs_planner_holds_after_every_step(budget, buffer, prompt, decode):
    """After each step the plugin holds what the planner holds, or ``budget`` where the planner holds a full cache
    that it compacts before the next token (the plugin compacts right after the step that fills it). The one step
    that differs, and every step after it: a piece of 2 to ``buffer`` tokens that overflows what the plugin holds."""
    capacity = budget + buffer
    planner = Planner(RKVConfig(budget=budget, buffer=buffer, window=1), 1, capacity, evicts=True)
    held, differs, compared = 0, False, 0
    pieces = [*prompt, *[1] * decode]
    for piece in pieces:
        step = next_step(held, piece, budget, buffer)
        planner.plan(piece)
        planner.ran()
        assert step.attended == held + piece and step.after <= capacity
        differs |= 1 < piece <= buffer and step.attended > capacity
        held = step.after
        if not differs:
            assert held == (budget if planner.used[0] == capacity else planner.used[0])
            compared += 1
    assert held == held_after(pieces, budget, buffer)
    assert compared >= 1


def test_a_step_must_schedule_tokens():
    try:
        next_step(3, 0, 8, 4)
    except ValueError as error:
        assert "at least one token" in str(error)
    else:
        raise AssertionError("a step of no tokens was accepted")
    assert blocks_for(64, 32) == 2 and blocks_for(65, 32) == 3 and blocks_for(0, 32) == 0


@settings(max_examples=25, deadline=None)
@given(
    held=st.integers(12, 70),
    budget=st.integers(8, 11),
    group=st.sampled_from([1, 2]),
    policy=st.sampled_from(["rkv", "snapkv", "streaming"]),
    seed=st.integers(0, 10_000),
)
def test_compaction_in_pages_keeps_what_rkv_flex_keeps_and_touches_no_other_request(held, budget, group, policy, seed):
    generator = torch.Generator().manual_seed(seed)
    heads, dim, block, window = 2, 8, 4, 3
    blocks = 40
    keys = torch.randn(blocks, heads, block, dim, generator=generator)
    values = torch.randn(blocks, heads, block, dim, generator=generator)
    before_keys, before_values = keys.clone(), values.clone()
    mine = torch.randperm(blocks, generator=generator)[: blocks_for(held, block)]  # the request's pages, any order
    queries = torch.randn(heads * group, window, dim, generator=generator)
    positions = (torch.arange(held) * 2 + 5).expand(heads, held)  # any increasing positions
    request_keys, request_values = read_slots(keys, mine, held), read_slots(values, mine, held)
    config = RKVConfig(budget=budget, buffer=held - budget, window=window, policy=policy)

    kept = compact_slots(
        make_policy(config),
        keys,
        values,
        mine,
        held,
        positions,
        queries,
        torch.ones(window, dtype=torch.bool),
        budget,
        window,
        dim**-0.5,
    )

    reference = LayerSlots(
        keys=request_keys[None].clone(),
        values=request_values[None].clone(),
        valid=torch.ones(1, heads, held, dtype=torch.bool),
        pos=positions[None].clone(),
        queries=queries[None],
        attention_sum=None,
    )
    state = reference.scoring_state(
        torch.tensor([held]), window, torch.ones(1, window, dtype=torch.bool), dim**-0.5, None
    )
    reference.keep_best(make_policy(config), config, state, None, None)
    assert torch.equal(kept, reference.pos[0, :, :budget])
    assert torch.equal(read_slots(keys, mine, budget), reference.keys[0, :, :budget])
    assert torch.equal(read_slots(values, mine, budget), reference.values[0, :, :budget])
    others = torch.ones(blocks, dtype=torch.bool)
    others[mine] = False
    assert torch.equal(keys[others], before_keys[others]) and torch.equal(values[others], before_values[others])


def test_slots_written_are_read_back_in_order_across_blocks():
    cache = torch.zeros(6, 2, 4, 3)
    pages = torch.tensor([5, 0, 3])
    slots = torch.arange(2 * 10 * 3, dtype=torch.float).view(2, 10, 3)
    write_slots(cache, pages, slots)
    assert torch.equal(read_slots(cache, pages, 10), slots)
    assert torch.equal(cache[5, :, 1], slots[:, 1]) and torch.equal(cache[3, :, 1], slots[:, 9])
    assert cache[[1, 2, 4]].abs().sum() == 0
