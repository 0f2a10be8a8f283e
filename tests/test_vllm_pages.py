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
from rkv_flex.vllm_plugin.pages import PageLayout, compact_slots, read_slots, slabs, write_slots


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(4, 40),
    buffer=st.integers(1, 24),
    prompt=st.lists(st.integers(1, 80), min_size=1, max_size=4),
    decode=st.integers(0, 90),
)
def test_each_step_holds_and_compacts_as_rkv_flexs_planner_plans(budget, buffer, prompt, decode):
    capacity = budget + buffer
    planner = Planner(RKVConfig(budget=budget, buffer=buffer, window=1), 1, capacity, evicts=True)
    held = 0
    pieces = [*prompt, *[1] * decode]
    for piece in pieces:
        step = next_step(held, piece, budget, buffer)
        plan = planner.plan(piece)
        planner.ran()
        assert step.compacts_first == bool(plan.compact) and step.compacts_after == plan.staged
        assert step.attended - piece == plan.used_before[0] and step.after == plan.used_after[0]
        assert step.attended <= capacity or step.compacts_after
        held = step.after
    assert held == held_after(pieces, budget, buffer)


def test_a_step_must_schedule_tokens():
    try:
        next_step(3, 0, 8, 4)
    except ValueError as error:
        assert "at least one token" in str(error)
    else:
        raise AssertionError("a step of no tokens was accepted")
    assert blocks_for(64, 32) == 2 and blocks_for(65, 32) == 3 and blocks_for(0, 32) == 0


LAYOUTS = {  # vLLM's fp32 CPU layout (keys transposed within a block) and a plain one
    "transposed keys": lambda block, dim: PageLayout(
        torch.arange(block * dim).view(dim, block).T.contiguous(),
        torch.arange(block * dim).view(block, dim) + block * dim,
    ),
    "plain": PageLayout.plain,
}


@settings(max_examples=25, deadline=None)
@given(
    held=st.integers(12, 70),
    budget=st.integers(8, 11),
    group=st.sampled_from([1, 2]),
    policy=st.sampled_from(["rkv", "snapkv", "streaming"]),
    layout=st.sampled_from(sorted(LAYOUTS)),
    seed=st.integers(0, 10_000),
)
def test_compaction_in_pages_keeps_what_rkv_flex_keeps_and_touches_no_other_request(
    held, budget, group, policy, layout, seed
):
    generator = torch.Generator().manual_seed(seed)
    heads, dim, block, window, blocks = 2, 8, 4, 3, 40
    cache = torch.randn(blocks, heads, block, 2 * dim, generator=generator)
    before = cache.clone()
    pages, page_layout = slabs(cache), LAYOUTS[layout](block, dim)
    mine = torch.randperm(blocks, generator=generator)[: blocks_for(held, block)]  # the request's pages, any order
    queries = torch.randn(heads * group, window, dim, generator=generator)
    positions = (torch.arange(held) * 2 + 5).expand(heads, held)  # any increasing positions
    request_keys, request_values = read_slots(pages, page_layout, mine, held)
    config = RKVConfig(budget=budget, buffer=held - budget, window=window, policy=policy)
    every_query = torch.ones(window, dtype=torch.bool)

    kept = compact_slots(
        make_policy(config), pages, page_layout, mine, positions, queries, every_query, budget, window, dim**-0.5
    )

    reference = LayerSlots(
        keys=request_keys[None].clone(),
        values=request_values[None].clone(),
        valid=torch.ones(1, heads, held, dtype=torch.bool),
        pos=positions[None].clone(),
        queries=queries[None],
        attention_sum=None,
    )
    state = reference.scoring_state(torch.tensor([held]), window, every_query[None], dim**-0.5, None)
    reference.keep_best(make_policy(config), config, state, None, None)
    kept_keys, kept_values = read_slots(pages, page_layout, mine, budget)
    assert torch.equal(kept, reference.pos[0, :, :budget])
    assert torch.equal(kept_keys, reference.keys[0, :, :budget])
    assert torch.equal(kept_values, reference.values[0, :, :budget])
    others = torch.ones(blocks, dtype=torch.bool)
    others[mine] = False
    assert torch.equal(cache[others], before[others])


def test_slots_written_are_read_back_in_order_across_blocks():
    cache = torch.zeros(6, 2, 4, 6)
    pages, layout, mine = slabs(cache), PageLayout.plain(4, 3), torch.tensor([5, 0, 3])
    keys = torch.arange(2 * 10 * 3, dtype=torch.float).view(2, 10, 3)
    write_slots(pages, layout, mine, keys, -keys)
    assert torch.equal(read_slots(pages, layout, mine, 10)[0], keys)
    assert torch.equal(read_slots(pages, layout, mine, 10)[1], -keys)
    assert torch.equal(pages[5, :, 3:6], keys[:, 1]) and torch.equal(pages[3, :, 3:6], keys[:, 9])  # token 1 of a block
    assert cache[[1, 2, 4]].abs().sum() == 0
