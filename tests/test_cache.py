"""Slot-cache invariants after any sequence of prefills, chunks, decode steps and compactions."""

from __future__ import annotations

import naive
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rkv_flex.cache import RKVCache
from rkv_flex.config import RKVConfig

BATCH, HEADS, KV_HEADS, DIM = 2, 4, 2, 4
SCALING = DIM**-0.5


class Driver:
    """Feeds random tokens through an RKVCache the way a model's attention layers do, and remembers them."""

    def __init__(self, config: RKVConfig, seed: int):
        self.config = config
        self.cache = RKVCache(config, num_layers=1, num_query_heads=HEADS)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.appended = {}  # (b, h, position) -> (key, value)
        self.real = []  # per position: bool [B], the token is not padding

    def forward(self, length: int, pads: list[int]):
        g = self.generator
        keys = torch.randn(BATCH, KV_HEADS, length, DIM, generator=g)
        # repeat some keys so near-duplicates exist
        if length > 2:
            keys[:, :, -1] = keys[:, :, 0] + 0.01
        values = torch.randn(BATCH, KV_HEADS, length, DIM, generator=g)
        query = torch.randn(BATCH, HEADS, length, DIM, generator=g)
        positions = (self.seen + torch.arange(length)).expand(BATCH, length)
        new_valid = torch.ones(BATCH, length, dtype=torch.bool)
        for row, pad in enumerate(pads):
            new_valid[row, :pad] = False
        before = self.snapshot()
        kwargs = {"position_ids": positions}
        self.cache.update(keys, values, 0, kwargs=kwargs)
        layer = kwargs["rkv_layer"]
        layer.observe(query, kwargs["position_ids"], None if new_valid.all() else new_valid, SCALING)
        for t in range(length):
            for b in range(BATCH):
                for h in range(KV_HEADS):
                    self.appended[b, h, self.seen + t] = (keys[b, h, t], values[b, h, t])
            self.real.append(new_valid[:, t])
        self.seen += length
        return before, (keys, values, positions, new_valid)

    @property
    def layer(self):
        return self.cache.layers[0]

    def snapshot(self):
        layer = self.layer
        if not layer.is_initialized:
            return None
        names = ("keys", "values", "valid", "pos", "queries", "query_valid", "n_used")
        return {name: getattr(layer, name).clone() for name in names} | {
            "compactions": self.cache.compactions,
            "slots_used": self.cache.slots_used,
        }


def reference_scores(config, keys, valid, window, queries, query_valid):
    candidates = valid & ~window
    attention = naive.importance(queries, query_valid, keys, candidates, config.kernel)
    return config.lam * attention - (1 - config.lam) * naive.redundancy(keys, valid, config.threshold)


def assert_invariants(driver: Driver):
    config, layer, cache = driver.config, driver.layer, driver.cache
    assert layer.keys.shape[2] == config.capacity  # memory never grows
    used = int(layer.n_used)
    assert used == cache.slots_used <= config.capacity
    assert not layer.valid[:, :, used:].any()
    assert cache.get_seq_length() == driver.seen == int(layer.n_seen)
    newest = range(max(0, driver.seen - config.window), driver.seen)
    for b in range(BATCH):
        for h in range(KV_HEADS):
            slots = layer.valid[b, h].nonzero().flatten().tolist()
            positions = layer.pos[b, h, slots].tolist()
            assert positions == sorted(set(positions))  # unique and in position order
            for slot, position in zip(slots, positions, strict=False):
                key, value = driver.appended[b, h, position]
                assert torch.equal(layer.keys[b, h, slot], key)
                assert torch.equal(layer.values[b, h, slot], value)
                assert bool(driver.real[position][b])  # padding is never a valid slot
            for position in newest:  # the window's real tokens are always kept
                assert position in positions or not bool(driver.real[position][b])


def assert_best_kept(driver: Driver, keys, valid, pos, window, queries, query_valid, appended_after=()):
    """The kept positions are the window plus the best by the reference R-KV score (ties allowed).

    ``appended_after``: positions written after the compaction, which are not part of the selection.
    """
    scores = reference_scores(driver.config, keys, valid, window, queries, query_valid)
    layer, budget = driver.layer, driver.config.budget
    for b in range(BATCH):
        for h in range(KV_HEADS):
            kept = set(layer.pos[b, h, layer.valid[b, h]].tolist()) - set(appended_after)
            candidates = [j for j in range(keys.shape[2]) if valid[b, h, j] and not window[j]]
            kept_c = [j for j in candidates if int(pos[b, h, j]) in kept]
            dropped = [j for j in candidates if int(pos[b, h, j]) not in kept]
            assert len(kept_c) == min(len(candidates), budget - int(window.sum()))
            if kept_c and dropped:
                assert min(scores[b, h, j] for j in kept_c) >= max(scores[b, h, j] for j in dropped) - 1e-6


@st.composite
def schedules(draw):
    prompt = draw(st.integers(1, 14))
    pads = [draw(st.integers(0, prompt - 1)) for _ in range(BATCH)]
    steps = draw(st.lists(st.one_of(st.just(1), st.integers(2, 5)), min_size=5, max_size=40))
    return prompt, pads, steps


@settings(max_examples=40, deadline=None)
@given(schedule=schedules(), seed=st.integers(0, 2**31), compact_prompt=st.booleans())
def test_invariants_and_reference_selection(schedule, seed, compact_prompt):
    """Any prefill / chunk / decode sequence: invariants hold after each forward, and every compaction kept the
    reference selection."""
    config = RKVConfig(budget=6, buffer=4, window=2, kernel=3, compact_prompt=compact_prompt)
    prompt, pads, steps = schedule
    driver = Driver(config, seed)
    if prompt > config.capacity and not compact_prompt:
        with pytest.raises(ValueError, match="does not fit"):
            driver.forward(prompt, pads)
        return
    for index, length in enumerate([prompt, *steps]):
        before, (keys, _values, positions, new_valid) = driver.forward(length, pads if index == 0 else [0] * BATCH)
        assert_invariants(driver)
        used = 0 if before is None else before["slots_used"]
        if used + length <= config.capacity and not (index == 0 and compact_prompt and length > config.budget):
            assert driver.cache.slots_used == used + length  # plain append
            continue
        layer = driver.layer
        if config.budget + length <= config.capacity:
            # compacted the full slots with the queries seen so far, then appended
            window = torch.zeros(config.capacity, dtype=torch.bool)
            window[used - config.window : used] = True
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
            # staged: the used slots and the new tokens compete, scored with the newest queries
            joined_valid = new_valid[:, None, :].expand(BATCH, KV_HEADS, length)
            joined_pos = positions[:, None, :].expand(BATCH, KV_HEADS, length)
            if before is not None:
                joined_valid = torch.cat([before["valid"][:, :, :used], joined_valid], dim=2)
                joined_pos = torch.cat([before["pos"][:, :, :used], joined_pos], dim=2)
                keys = torch.cat([before["keys"][:, :, :used], keys], dim=2)
            window = torch.zeros(used + length, dtype=torch.bool)
            window[-config.window :] = True
            assert_best_kept(driver, keys, joined_valid, joined_pos, window, layer.queries, layer.query_valid)
            assert driver.cache.slots_used == config.budget


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_compaction_keeps_the_reference_selection(seed):
    """Decode-time compaction: fill the slots, then compare the kept set with the naive R-KV selection."""
    config = RKVConfig(budget=6, buffer=4, window=2, kernel=3)
    driver = Driver(config, seed)
    driver.forward(config.capacity, [0, 0])  # exactly full: a prompt of capacity > budget is staged to budget
    while driver.cache.slots_used < config.capacity:
        driver.forward(1, [0, 0])
    layer = driver.layer
    state = {
        name: getattr(layer, name).clone() for name in ("keys", "values", "valid", "pos", "queries", "query_valid")
    }
    window = torch.zeros(config.capacity, dtype=torch.bool)
    window[-config.window :] = True
    driver.cache.compact()
    assert driver.cache.slots_used == config.budget == int(layer.n_used)
    assert_best_kept(
        driver, state["keys"], state["valid"], state["pos"], window, state["queries"], state["query_valid"]
    )
    assert_invariants(driver)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), prompt=st.integers(7, 20), pad=st.integers(0, 5))
def test_prompt_longer_than_budget_is_staged_to_the_reference_selection(seed, prompt, pad):
    config = RKVConfig(budget=6, buffer=4, window=2, kernel=3)
    driver = Driver(config, seed)
    _, (keys, _values, positions, new_valid) = driver.forward(prompt, [0, pad])
    layer = driver.layer
    valid = new_valid[:, None, :].expand(BATCH, KV_HEADS, prompt)
    window = torch.zeros(prompt, dtype=torch.bool)
    window[-config.window :] = True
    pos = positions[:, None, :].expand(BATCH, KV_HEADS, prompt)
    assert driver.cache.slots_used == config.budget
    assert_best_kept(driver, keys, valid, pos, window, layer.queries, layer.query_valid)
    assert_invariants(driver)


def test_decoding_stays_within_capacity_over_many_steps():
    config = RKVConfig(budget=6, buffer=4, window=2, kernel=3)
    driver = Driver(config, 0)
    driver.forward(3, [0, 1])
    for _ in range(60):
        driver.forward(1, [0, 0])
        assert driver.cache.slots_used <= config.capacity
    assert driver.cache.compactions == (3 + 60 - config.capacity) // config.buffer + 1
    assert_invariants(driver)
