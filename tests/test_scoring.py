"""Every scoring function equals a naive per-head loop written from the formulas (docs/method.md)."""

from __future__ import annotations

import naive
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rkv_flex.masks import dense_slot_mask
from rkv_flex.policies import RKV, Random, SlotState, SnapKV, Streaming
from rkv_flex.scoring import importance, received_attention, redundancy, select_keep

WINDOW = 3


@st.composite
def slot_states(draw):
    """Random slots [B, Hkv, S] with some invalid ones, the window at the end, random queries and scaling."""
    batch, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    slots = draw(st.integers(WINDOW + 2, 16))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    keys = torch.randn(batch, kv_heads, slots, 4, generator=generator)
    # near-duplicate keys so the redundancy threshold and exemption rule matter
    copies = draw(st.lists(st.tuples(st.integers(0, slots - 1), st.integers(0, slots - 1)), max_size=4))
    for src, dst in copies:
        keys[:, :, dst] = keys[:, :, src] + 0.05 * torch.randn(batch, kv_heads, 4, generator=generator)
    valid = torch.rand(batch, kv_heads, slots, generator=generator) > draw(st.sampled_from([0.0, 0.3]))
    valid[:, :, -WINDOW:] = True
    window = torch.zeros(batch, 1, slots, dtype=torch.bool)
    window[..., -WINDOW:] = True
    query_valid = torch.rand(batch, WINDOW, generator=generator) > 0.2
    query_valid[:, -1] = True
    return SlotState(
        keys=keys,
        values=torch.randn(batch, kv_heads, slots, 4, generator=generator),
        valid=valid,
        pos=torch.arange(slots).expand(batch, kv_heads, slots) * 3 + 5,
        window=window,
        queries=2 * torch.randn(batch, kv_heads * group, WINDOW, 4, generator=generator),
        query_valid=query_valid,
        attention_sum=torch.rand(batch, kv_heads, slots, generator=generator),
        scaling=draw(st.sampled_from([0.5, 0.125, 1.3])),
    )


@settings(max_examples=40, deadline=None)
@given(state=slot_states(), kernel=st.sampled_from([1, 3, 7]))
def test_importance_equals_naive_loop(state, kernel):
    got = importance(state.queries, state.query_valid, state.keys, state.candidates, kernel, state.scaling)
    want = naive.importance(state.queries, state.query_valid, state.keys, state.candidates, kernel, state.scaling)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(state=slot_states(), threshold=st.sampled_from([0.5, 0.9, -0.2]), block=st.sampled_from([1, 3, 256]))
def test_redundancy_equals_naive_loop_in_any_block_size(state, threshold, block):
    got = redundancy(state.keys, state.valid, threshold, block=block)
    want = naive.redundancy(state.keys, state.valid, threshold)
    torch.testing.assert_close(got.double()[state.valid], want[state.valid], rtol=1e-5, atol=1e-6)


def test_redundancy_ranks_the_oldest_duplicate_most_redundant():
    """A cluster a < b < c of near-copies: the newest copy looks least redundant (docs/method.md)."""
    keys = torch.eye(8)[None, None].repeat(1, 1, 1, 1)
    keys[0, 0, 6] = keys[0, 0, 2] + 0.01
    keys[0, 0, 7] = keys[0, 0, 2] - 0.01
    scores = redundancy(keys, torch.ones(1, 1, 8, dtype=torch.bool), 0.5)[0, 0]
    assert scores[2] > scores[6] > scores[7]


@settings(max_examples=40, deadline=None)
@given(state=slot_states(), lam=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_rkv_score_and_selection_equal_naive(state, lam):
    scores = RKV(lam=lam, kernel=3, threshold=0.5)(state)
    attention = naive.importance(state.queries, state.query_valid, state.keys, state.candidates, 3, state.scaling)
    uniform = 1 / state.valid.sum(-1, keepdim=True).double()
    want = lam * attention - (1 - lam) * (naive.redundancy(state.keys, state.valid, 0.5) - uniform)
    torch.testing.assert_close(scores.double()[state.valid], want[state.valid], rtol=1e-5, atol=1e-6)
    assert_is_best_selection(scores, state, select_keep(scores, state.valid, state.window, WINDOW + 2), WINDOW + 2)


@settings(max_examples=30, deadline=None)
@given(state=slot_states(), kernel=st.sampled_from([1, 5]))
def test_snapkv_equals_the_naive_pooled_window_attention(state, kernel):
    want = naive.importance(state.queries, state.query_valid, state.keys, state.candidates, kernel, state.scaling)
    torch.testing.assert_close(SnapKV(kernel=kernel)(state).double(), want, rtol=1e-5, atol=1e-6)


def assert_is_best_selection(scores, state, got, keep):
    """Ties allowed: every window slot kept, and no dropped candidate scores above a kept one."""
    window = state.window[:, 0]
    for b in range(state.valid.shape[0]):
        for h in range(state.valid.shape[1]):
            kept = got[b, h].tolist()
            filler = [j for j in kept if not state.valid[b, h, j]]
            assert kept == filler + sorted(set(kept) - set(filler))  # filler first, then in slot order
            assert all(j in kept for j in range(window.shape[1]) if window[b, j])
            candidates = [j for j in range(window.shape[1]) if state.valid[b, h, j] and not window[b, j]]
            kept_candidates = [j for j in candidates if j in kept]
            assert len(kept_candidates) == min(len(candidates), keep - int(window[b].sum()))
            dropped = [j for j in candidates if j not in kept]
            if kept_candidates and dropped:
                assert min(scores[b, h, j] for j in kept_candidates) >= max(scores[b, h, j] for j in dropped)


@settings(max_examples=30, deadline=None)
@given(state=slot_states(), sinks=st.integers(0, 2))
def test_streaming_keeps_sinks_and_most_recent(state, sinks):
    slots = state.valid.shape[2]
    keep = min(WINDOW + sinks + 1, slots)
    got = select_keep(Streaming(sinks)(state), state.valid, state.window, keep)
    for b in range(state.valid.shape[0]):
        window = {j for j in range(slots) if state.window[b, 0, j]}
        for h in range(state.valid.shape[1]):
            valid_slots = [j for j in range(slots) if state.valid[b, h, j]]
            want = window | set(valid_slots[:sinks])
            recent = [j for j in reversed(valid_slots) if j not in want]
            want |= set(recent[: max(0, keep - len(want))])
            assert {j for j in got[b, h].tolist() if state.valid[b, h, j]} == want


def test_random_policy_is_deterministic_per_seed_and_differs_across_seeds():
    pos = torch.arange(40).expand(1, 2, 40)
    state = SlotState(
        keys=torch.zeros(1, 2, 40, 4),
        values=torch.zeros(1, 2, 40, 4),
        valid=torch.ones(1, 2, 40, dtype=torch.bool),
        pos=pos,
        window=torch.zeros(1, 1, 40, dtype=torch.bool),
        queries=torch.zeros(1, 2, 1, 4),
        query_valid=torch.ones(1, 1, dtype=torch.bool),
    )
    first, again, other = Random(0)(state), Random(0)(state), Random(1)(state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0, 0], first[0, 1])  # heads rank differently
    assert len(set(first[0, 0].tolist())) == 40
    # not a linear function of the position (the old lattice): successive differences take many values
    steps = (first[0, 0, 1:] - first[0, 0, :-1]).tolist()
    assert len(set(steps)) > 30
    compiled = torch.compile(Random(0), backend="inductor", fullgraph=True)(state)
    assert torch.equal(compiled, first)


@settings(max_examples=30, deadline=None)
@given(
    state=slot_states(), length=st.integers(1, 5), block=st.sampled_from([1, 2, 256]), window=st.sampled_from([None, 7])
)
def test_received_attention_equals_naive_in_any_block_size(state, length, block, window):
    batch = state.valid.shape[0]
    query = torch.randn(batch, state.queries.shape[1], length, 4)
    query_pos = state.pos[:, 0, -length:]
    allowed = dense_slot_mask(state.valid, state.pos, query_pos, window)
    got = received_attention(query, state.keys, state.valid, state.pos, query_pos, None, 0.5, window, block=block)
    torch.testing.assert_close(
        got.double(), naive.received_attention(query, state.keys, allowed, 0.5), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("keep", [WINDOW, WINDOW + 4])
def test_select_keep_always_keeps_the_window_and_never_an_invalid_slot_when_enough_are_valid(keep):
    scores = torch.randn(2, 3, 12)
    valid = torch.ones(2, 3, 12, dtype=torch.bool)
    valid[:, :, :2] = False
    window = torch.zeros(2, 1, 12, dtype=torch.bool)
    window[..., -WINDOW:] = True
    scores[:, :, -WINDOW:] = -100.0  # the window is kept even with the worst scores
    scores[:, :, :2] = 100.0  # invalid slots are never kept, even with the best scores
    got = select_keep(scores, valid, window, keep)
    assert got.shape == (2, 3, keep)
    assert (got >= 2).all()
    assert torch.isin(torch.arange(12 - WINDOW, 12), got[0, 0]).all()
    assert (got.diff(dim=-1) > 0).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_bf16_redundancy_keeps_the_fp32_choice_where_scores_are_not_near_tied(seed):
    """Half-precision similarity (what a bf16 model computes) changes only near-tied choices."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 8, 48, 16, generator=generator)
    keys[:, :, 20:30] = keys[:, :, 0:10] + 0.1 * torch.randn(2, 8, 10, 16, generator=generator)
    valid = torch.ones(2, 8, 48, dtype=torch.bool)
    exact = redundancy(keys, valid, 0.5)
    half = redundancy(keys.to(torch.bfloat16), valid, 0.5)
    window = torch.zeros(2, 1, 48, dtype=torch.bool)
    ranked = exact.sort(dim=-1, descending=True).values
    keep = 24
    margin = ranked[..., keep - 1] - ranked[..., keep]  # gap at the selection boundary, per row and head
    tolerance = 2 * (half - exact).abs().amax(dim=-1)  # a pair near the threshold may flip: a whole row's error
    clear = margin > tolerance
    assert clear.any()
    kept_exact = select_keep(-exact, valid, window, keep)
    kept_half = select_keep(-half, valid, window, keep)
    assert torch.equal(kept_exact[clear], kept_half[clear])


def test_select_keep_puts_invalid_filler_before_the_kept_tokens():
    """With fewer valid slots than ``keep``, the filler slots come first and the valid ones follow in slot order,
    so the newest kept slots are still the newest tokens (the next window)."""
    valid = torch.tensor([[[False, True, True, False, True, False, False, False]]])
    window = torch.zeros(1, 1, 8, dtype=torch.bool)
    window[..., 4] = True
    got = select_keep(torch.randn(1, 1, 8), valid, window, 6)[0, 0]
    assert not valid[0, 0, got[:3]].any()
    assert got[3:].tolist() == [1, 2, 4]
