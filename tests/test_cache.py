"""Slot-cache invariants after any sequence of prefills, chunks, decode steps and compactions, driven through the
cache and the attention function exactly as a model layer drives them."""

from __future__ import annotations

import naive
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rkv_flex.attention import rkv_attention
from rkv_flex.cache import LayerSpec, RKVCache
from rkv_flex.compiled import private_copy
from rkv_flex.config import RKVConfig
from rkv_flex.slots import put_along

BATCH, HEADS, KV_HEADS, DIM = 2, 4, 2, 4
SCALING = 0.7  # not 1/sqrt(DIM): scores must use the model's scaling


class Driver:
    """Feeds random tokens through an RKVCache and ``rkv_attention`` the way a decoder layer does, and remembers
    every token's key and value."""

    def __init__(self, config: RKVConfig, seed: int):
        self.config = config
        self.cache = RKVCache(config, [LayerSpec(HEADS // KV_HEADS)])
        self.generator = torch.Generator().manual_seed(seed)
        self.module = torch.nn.Module()
        self.seen = 0
        self.appended = {}  # (b, h, position) -> (key, value)
        self.real = []  # per position: bool [B], the token is not padding

    def forward(self, length: int, pads: list[int]):
        g = self.generator
        keys = torch.randn(BATCH, KV_HEADS, length, DIM, generator=g)
        if length > 2:  # near-duplicates, so the redundancy threshold matters
            keys[:, :, -1] = keys[:, :, 0] + 0.01
        values = torch.randn(BATCH, KV_HEADS, length, DIM, generator=g)
        query = torch.randn(BATCH, HEADS, length, DIM, generator=g)
        positions = (self.seen + torch.arange(length)).expand(BATCH, length)
        new_valid = torch.ones(BATCH, length, dtype=torch.bool)
        for row, pad in enumerate(pads):
            new_valid[row, :pad] = False
        before = self.snapshot()
        kwargs = {"position_ids": positions}
        key_out, value_out = self.cache.update(keys, values, 0, kwargs=kwargs)
        padding = None if length == 1 else new_valid
        rkv_attention(self.module, query, key_out, value_out, padding, scaling=SCALING, **kwargs)
        for t in range(length):
            for b in range(BATCH):
                for h in range(KV_HEADS):
                    self.appended[b, h, self.seen + t] = (keys[b, h, t], values[b, h, t])
            self.real.append(new_valid[:, t])
        self.seen += length
        return before, (keys, positions, new_valid)

    @property
    def layer(self):
        return self.cache.layers[0]

    @property
    def used(self) -> int:
        return self.cache.planner.used[0]

    def snapshot(self):
        if not self.layer.is_initialized:
            return None
        slots, counters = self.layer.slots, self.cache.shared.counters
        tensors = {name: getattr(slots, name).clone() for name in ("keys", "values", "valid", "pos", "queries")}
        return tensors | {"query_valid": counters.query_valid.clone(), "used": self.used}


def reference_scores(config, keys, valid, window, queries, query_valid):
    candidates = valid & ~window
    attention = naive.importance(queries, query_valid, keys, candidates, config.kernel, SCALING)
    return config.lam * attention - (1 - config.lam) * naive.redundancy(keys, valid, config.threshold)


def assert_invariants(driver: Driver):
    config, layer, cache = driver.config, driver.layer, driver.cache
    slots = layer.slots
    assert slots.keys.shape[2] == config.capacity  # memory never grows
    used = driver.used
    assert used <= config.capacity
    assert (cache.shared.counters.used == used).all()
    assert not slots.valid[:, :, used:].any()
    assert cache.get_seq_length() == driver.seen == int(cache.shared.counters.seen[0])
    newest = range(max(0, driver.seen - config.window), driver.seen)
    for b in range(BATCH):
        for h in range(KV_HEADS):
            held = slots.valid[b, h].nonzero().flatten().tolist()
            positions = slots.pos[b, h, held].tolist()
            assert positions == sorted(set(positions))  # unique and in position order
            for slot, position in zip(held, positions, strict=True):
                key, value = driver.appended[b, h, position]
                assert torch.equal(slots.keys[b, h, slot], key)
                assert torch.equal(slots.values[b, h, slot], value)
                assert bool(driver.real[position][b])  # padding is never a valid slot
            for position in newest:  # the window's real tokens are always kept
                assert position in positions or not bool(driver.real[position][b])


def assert_best_kept(driver: Driver, keys, valid, pos, window, queries, query_valid, appended_after=()):
    """The kept positions are the window plus the best by the naive R-KV score (ties allowed).

    ``appended_after``: positions written after the compaction, which are not part of the selection.
    """
    scores = reference_scores(driver.config, keys, valid, window, queries, query_valid)
    slots, budget = driver.layer.slots, driver.config.budget
    for b in range(BATCH):
        for h in range(KV_HEADS):
            kept = set(slots.pos[b, h, slots.valid[b, h]].tolist()) - set(appended_after)
            candidates = [j for j in range(keys.shape[2]) if valid[b, h, j] and not window[b, 0, j]]
            kept_c = [j for j in candidates if int(pos[b, h, j]) in kept]
            dropped = [j for j in candidates if int(pos[b, h, j]) not in kept]
            assert len(kept_c) == min(len(candidates), budget - int((window[b, 0] & valid[b, h]).sum()))
            if kept_c and dropped:
                assert min(scores[b, h, j] for j in kept_c) >= max(scores[b, h, j] for j in dropped) - 1e-6


def window_at(length: int, first: int, count: int) -> torch.Tensor:
    window = torch.zeros(BATCH, 1, length, dtype=torch.bool)
    window[..., first : first + count] = True
    return window


@st.composite
def schedules(draw):
    prompt = draw(st.integers(1, 14))
    pads = [draw(st.integers(0, prompt - 1)) for _ in range(BATCH)]
    steps = draw(st.lists(st.one_of(st.just(1), st.integers(2, 7)), min_size=5, max_size=40))
    return prompt, pads, steps


@settings(max_examples=40, deadline=None)
@given(
    schedule=schedules(),
    seed=st.integers(0, 2**31),
    compact_prompt=st.booleans(),
    sizes=st.sampled_from([(6, 4, 2), (6, 2, 4)]),  # (budget, buffer, window): a window wider than the buffer too
)
def test_invariants_and_reference_selection(schedule, seed, compact_prompt, sizes):
    """Any prefill / chunk / decode sequence: invariants hold after each forward, and every compaction kept the
    naive reference selection (compact-then-append with the queries seen so far; staged with the newest ones)."""
    budget, buffer, window = sizes
    config = RKVConfig(
        budget=budget, buffer=buffer, window=window, kernel=3, compact_prompt=compact_prompt, attention="sdpa"
    )
    prompt, pads, steps = schedule
    driver = Driver(config, seed)
    if prompt > config.capacity and not compact_prompt:
        with pytest.raises(ValueError, match="does not fit"):
            driver.forward(prompt, pads)
        return
    for index, length in enumerate([prompt, *steps]):
        before, (keys, positions, new_valid) = driver.forward(length, pads if index == 0 else [0] * BATCH)
        assert_invariants(driver)
        used = 0 if before is None else before["used"]
        if used + length <= config.capacity:
            assert driver.used == used + length  # plain append
            continue
        slots = driver.layer.slots
        if config.budget + length <= config.capacity:
            # compacted the full slots with the queries seen so far, then appended
            assert driver.used == config.budget + length
            window = window_at(config.capacity, used - config.window, config.window)
            assert_best_kept(
                driver,
                before["keys"],
                before["valid"],
                before["pos"],
                window,
                before["queries"],
                before["query_valid"],
                appended_after=positions[0].tolist(),
            )
        else:
            # staged: every slot and the new tokens compete, scored with the newest queries
            assert driver.used == config.budget
            capacity = config.capacity
            if before is None:  # the first forward: the slots are empty
                before = {
                    "valid": torch.zeros(BATCH, KV_HEADS, capacity, dtype=torch.bool),
                    "pos": torch.zeros(BATCH, KV_HEADS, capacity, dtype=torch.long),
                    "keys": torch.zeros(BATCH, KV_HEADS, capacity, DIM),
                }
            joined_valid = torch.cat([before["valid"], new_valid[:, None, :].expand(BATCH, KV_HEADS, length)], 2)
            joined_pos = torch.cat([before["pos"], positions[:, None, :].expand(BATCH, KV_HEADS, length)], 2)
            joined_keys = torch.cat([before["keys"], keys], dim=2)
            # the newest tokens: the new ones, and the newest used slots when the new ones are fewer
            newest = min(length, config.window)
            window = window_at(capacity + length, capacity + length - newest, newest)
            older = config.window - length
            if older > 0:
                window[..., max(0, used - older) : used] = True
            query_valid = driver.cache.shared.counters.query_valid
            assert_best_kept(driver, joined_keys, joined_valid, joined_pos, window, slots.queries, query_valid)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_decoding_compaction_keeps_the_reference_selection(seed):
    """Fill the slots by decoding, then compact: the kept set is the naive R-KV selection."""
    config = RKVConfig(budget=6, buffer=4, window=2, kernel=3, attention="sdpa")
    driver = Driver(config, seed)
    driver.forward(3, [0, 1])
    while driver.used < config.capacity:
        driver.forward(1, [0, 0])
    state = driver.snapshot()
    driver.cache.compact()
    assert driver.used == config.budget and (driver.cache.shared.counters.used == config.budget).all()
    window = window_at(config.capacity, config.capacity - config.window, config.window)
    assert_best_kept(
        driver, state["keys"], state["valid"], state["pos"], window, state["queries"], state["query_valid"]
    )
    assert_invariants(driver)


def test_decoding_stays_within_capacity_over_many_steps():
    config = RKVConfig(budget=6, buffer=4, window=2, kernel=3, attention="sdpa")
    driver = Driver(config, 0)
    driver.forward(3, [0, 1])
    for _ in range(60):
        driver.forward(1, [0, 0])
        assert driver.used <= config.capacity
    assert driver.cache.compactions == (3 + 60 - config.capacity - 1) // config.buffer + 1
    assert_invariants(driver)


def test_scores_use_the_models_query_scaling():
    """The same tokens with another query scaling choose other slots: the scaling reaches the importance score."""
    kept = []
    for scaling in (0.05, 5.0):
        config = RKVConfig(budget=6, buffer=4, window=2, kernel=1, lam=1.0, attention="sdpa")
        driver = Driver(config, 3)
        global SCALING
        old, SCALING = SCALING, scaling
        try:
            driver.forward(10, [0, 0])
            driver.forward(1, [0, 0])  # compacts with the prompt's last queries
        finally:
            SCALING = old
        assert driver.cache.shared.scaling == scaling
        kept.append(driver.layer.slots.pos[driver.layer.slots.valid].tolist())
    assert kept[0] != kept[1]


@settings(deadline=None, max_examples=40)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(2, 6), st.integers(1, 4)),
    dim=st.integers(1, 2),
    count=st.integers(1, 2),
    accumulate=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_put_along_equals_scatter(shape, dim, count, accumulate, seed):
    """The in-place write the slot layouts use equals scatter_ (or scatter_add_, with repeated targets) along
    ``dim``, on whole trailing vectors: eagerly (scatter_ itself) and traced (index_put_, which inductor keeps in
    place)."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator)
    leading = shape[:dim]
    if accumulate:
        index = torch.randint(0, shape[dim], (*leading, count), generator=generator)
    else:  # scatter_ with repeated targets keeps an unspecified one: distinct targets per leading index
        index = torch.rand((*leading, shape[dim]), generator=generator).argsort(-1)[..., : min(count, shape[dim])]
    new = torch.randn((*index.shape, *shape[dim + 1 :]), generator=generator)
    expanded = index.view(*index.shape, *(1,) * (len(shape) - dim - 1)).expand_as(new)
    expected = tensor.clone()
    (expected.scatter_add_ if accumulate else expected.scatter_)(dim, expanded, new)
    eager = tensor.clone()
    put_along(eager, dim, index, new, accumulate=accumulate)
    assert torch.allclose(eager, expected, atol=1e-6)
    compiled = tensor.clone()
    traced = torch.compile(private_copy(put_along), backend="eager", fullgraph=True, dynamic=False)
    traced(compiled, dim, index, new, accumulate=accumulate)
    assert torch.allclose(compiled, expected, atol=1e-6)
