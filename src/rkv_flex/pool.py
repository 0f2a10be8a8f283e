"""Pooled slot storage for head-adaptive budgets: all KV heads of one layer share one pool of slots per row.

Head ``h`` of a row owns the contiguous segment ``[start[h], start[h] + kept[h] + buffer)`` of the pool: the
``kept[h]`` slots it kept at the last compaction, then room for the ``buffer`` tokens decoded before the next one.
The pool holds ``kv_heads * (budget + buffer)`` slots (plus one sink slot, never holding a token, on models with
attention sinks): the uniform layout's bytes, however the heads split them. Before the first compaction every head
owns ``budget + buffer`` slots in head order, as in the uniform layout.

Decoding reads the pool in place (attention masks each query head to its KV head's segment); compaction and
multi-token forwards work on a per-head view gathered from it (:meth:`PooledSlots.heads`, a temporary of at most
``ceiling + buffer`` slots per head) and write the kept slots back with :meth:`PooledSlots.repack`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .policies import Policy, SlotState
from .scoring import select_adaptive
from .slots import LayerSlots, RingSlots, SlotStorage, put_along, static, write_rows

if TYPE_CHECKING:
    from .config import RKVConfig


@torch.compiler.nested_compile_region
def adaptive_region(policy: Policy, total: int, floor: int, ceiling: int, state: SlotState) -> Tensor:
    """The slots [B, Hkv, S] a pooled layer keeps: ``total`` over its heads, shared out by score (a region compiled
    once and reused by every layer of a traced compaction; a plain call when eager)."""
    return select_adaptive(policy(state), state.valid, state.window, total, floor, ceiling)


def allocate_slots(
    config: RKVConfig,
    query_group: int,
    sinks: bool,
    batch: int,
    key_states: Tensor,
    value_states: Tensor,
    tracks_attention: bool,
    ring: int | None = None,
    values_in_keys: bool = False,
) -> SlotStorage:
    """A layer's slot storage in the layout ``config.allocation`` names, for keys and values like the given ones
    (their KV heads are the ones this process holds: tensor parallelism shards them); a sliding-window layer whose
    window fits the budgeted slots gets a ring of exactly ``ring`` slots instead. ``values_in_keys``: the values are
    the keys' first channels (an MLA latent), stored once."""
    _, kv_heads, _, key_dim = key_states.shape
    shape = dict(
        window=config.window,
        key_dim=key_dim,
        value_dim=value_states.shape[-1],
        dtype=key_states.dtype,
        device=key_states.device,
        tracks_attention=tracks_attention,
        sinks=sinks,
    )
    query_heads = kv_heads * query_group
    if ring is not None:
        shape = {**shape, "tracks_attention": False, "values_in_keys": values_in_keys}
        return RingSlots.allocate(batch, kv_heads, query_heads, ring, **shape)
    if config.allocation == "adaptive":
        if values_in_keys:
            raise ValueError("head-adaptive budgets move budget between KV heads; a latent (MLA) layer has one")
        ceiling = config.ceiling_slots
        return PooledSlots.allocate(batch, kv_heads, query_heads, config.budget, config.buffer, ceiling, **shape)
    return LayerSlots.allocate(batch, kv_heads, query_heads, config.capacity, **shape, values_in_keys=values_in_keys)


class PooledSlots(SlotStorage):
    """One layer's pool: ``keys`` [B, 1, P, D], ``values`` [B, 1, P, Dv], ``valid``/``pos`` [B, 1, P], the query ring
    ``queries`` [B, Hq, W, D], ``attention_sum`` [B, 1, P] (policies that track it) and the segments ``start`` /
    ``kept`` [B, Hkv]."""

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        valid: Tensor,
        pos: Tensor,
        queries: Tensor,
        attention_sum: Tensor | None,
        start: Tensor,
        kept: Tensor,
        budget: int,
        buffer: int,
        view_length: int,
        sinks: bool,
    ):
        self.keys, self.values, self.valid, self.pos = keys, values, valid, pos
        self.queries, self.attention_sum, self.start, self.kept = queries, attention_sum, start, kept
        self.budget, self.buffer, self.view_length, self.sinks = budget, buffer, view_length, sinks

    @classmethod
    def allocate(
        cls,
        batch: int,
        kv_heads: int,
        query_heads: int,
        budget: int,
        buffer: int,
        ceiling: int,
        window: int,
        key_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tracks_attention: bool,
        sinks: bool,
    ) -> PooledSlots:
        slots = (batch, 1, kv_heads * (budget + buffer) + sinks)
        pool = cls(
            keys=static(torch.zeros(*slots, key_dim, dtype=dtype, device=device)),
            values=static(torch.zeros(*slots, value_dim, dtype=dtype, device=device)),
            valid=static(torch.zeros(slots, dtype=torch.bool, device=device)),
            pos=static(torch.zeros(slots, dtype=torch.long, device=device)),
            queries=static(torch.zeros(batch, query_heads, window, key_dim, dtype=dtype, device=device)),
            attention_sum=static(torch.zeros(slots, dtype=torch.float32, device=device)) if tracks_attention else None,
            start=static(torch.zeros(batch, kv_heads, dtype=torch.long, device=device)),
            kept=static(torch.zeros(batch, kv_heads, dtype=torch.long, device=device)),
            budget=budget,
            buffer=buffer,
            view_length=ceiling + buffer,
            sinks=sinks,
        )
        pool.reset()
        return pool

    def tensors(self) -> dict[str, Tensor | None]:
        return {
            "keys": self.keys,
            "values": self.values,
            "valid": self.valid,
            "pos": self.pos,
            "queries": self.queries,
            "attention_sum": self.attention_sum,
            "start": self.start,
            "kept": self.kept,
        }

    def _with(self, tensors: dict[str, Any]) -> PooledSlots:
        return PooledSlots(
            **tensors, budget=self.budget, buffer=self.buffer, view_length=self.view_length, sinks=self.sinks
        )

    @property
    def token_slots(self) -> int:
        """Slots that can hold tokens (all but the sink slot)."""
        return self.capacity - self.sinks

    @property
    def kv_heads(self) -> int:
        return self.start.shape[1]

    # -- where each head's tokens are ----------------------------------------------------------------------------
    @property
    def end(self) -> Tensor:
        """[B, Hkv]: one past the last slot each head owns."""
        return self.start + self.kept + self.buffer

    def owned(self) -> Tensor:
        """[B, Hkv, P]: the pool slots each KV head owns."""
        slot = torch.arange(self.capacity, device=self.start.device)
        return (slot >= self.start[..., None]) & (slot < self.end[..., None])

    def occupancy(self, used: Tensor) -> Tensor:
        """[B, Hkv]: slots each head holds when its row has ``used`` [B] slots by the uniform count (every head
        appended ``used - budget`` tokens since it kept ``kept``)."""
        return self.kept + used[:, None] - self.budget

    # -- the protocol ---------------------------------------------------------------------------------------------
    uniform = False

    @property
    def view_capacity(self) -> int:
        return self.view_length + self.sinks

    def allowed(self) -> Tensor:
        return self.valid & self.owned()

    @property
    def segments(self) -> tuple[Tensor, Tensor, int]:
        return self.start, self.kept, self.buffer

    def per_head(self, tensor: Tensor) -> Tensor:
        return tensor.expand(-1, self.kv_heads, *tensor.shape[2:])

    def add_attention(self, received: Tensor) -> None:
        self.attention_sum += received.sum(dim=1, keepdim=True)

    def append(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        new_valid: Tensor | None,
        offset: int,
        attention: Tensor | None = None,
    ) -> None:
        batch, heads, length = keys.shape[:3]
        step = torch.arange(length, device=keys.device)
        at = ((self.start + self.kept - self.budget)[..., None] + offset + step).flatten(1)
        valid = torch.ones(batch, length, dtype=torch.bool, device=keys.device) if new_valid is None else new_valid
        self._scatter(at, keys.flatten(1, 2), values.flatten(1, 2), positions, valid, heads)
        if attention is not None and self.attention_sum is not None:
            put_along(self.attention_sum, 2, at[:, None], attention.flatten(1)[:, None])

    def append_rows(self, keys: Tensor, values: Tensor, positions: Tensor, slot: Tensor, fed: Tensor) -> None:
        heads = keys.shape[1]
        at = (self.start + self.kept - self.budget + slot[:, None]).clamp(min=0)
        valid = torch.ones_like(positions, dtype=torch.bool)
        self._scatter(at, keys[:, :, 0], values[:, :, 0], positions, valid, heads, fed)

    def _scatter(
        self,
        at: Tensor,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        valid: Tensor,
        heads: int,
        fed: Tensor | None = None,
    ) -> None:
        """Tokens [B, N, D] to pool slots ``at`` [B, N] (N = heads x tokens, head-major), in the rows ``fed`` [B]
        only (None: all); ``positions`` and ``valid`` [B, tokens] are the same for every head."""

        def write(tensor: Tensor, new: Tensor) -> None:
            # into the whole [B, 1, P, ...] tensor: an index_put_ on its [:, 0] view is copied back whole by inductor
            put_along(tensor, 2, at[:, None], new[:, None], fed)

        write(self.keys, keys)
        write(self.values, values)
        write(self.pos, positions.repeat(1, heads))
        write(self.valid, valid.repeat(1, heads))
        if self.attention_sum is not None:
            write(self.attention_sum, torch.zeros_like(at, dtype=self.attention_sum.dtype))

    def keep_best(
        self, policy: Policy, config: RKVConfig, state: SlotState, rows: Tensor | None, fed: Tensor | None
    ) -> None:
        total = config.budget * self.kv_heads
        keep = adaptive_region(policy, total, config.floor_slots, config.ceiling_slots, state)
        self.repack(state, keep, rows, fed)

    def reset(self, rows: slice = slice(None)) -> None:
        """Forget what some rows hold: every head back to its uniform segment."""
        self.valid[rows] = False
        if self.attention_sum is not None:
            self.attention_sum[rows] = 0.0
        head = torch.arange(self.kv_heads, device=self.start.device)
        self.start[rows] = head * (self.budget + self.buffer)
        self.kept[rows] = self.budget

    # -- the per-head view ---------------------------------------------------------------------------------------
    def sources(self, used: Tensor) -> tuple[Tensor, Tensor]:
        """Where the per-head view reads from: pool slot [B, Hkv, V] of each view slot, and whether the head holds a
        token there [B, Hkv, V] (V = ``view_length``)."""
        index = torch.arange(self.view_length, device=self.start.device)
        source = (self.start[..., None] + index).clamp(max=self.token_slots - 1)
        return source, index < self.occupancy(used)[..., None]

    def heads(self, used: Tensor) -> LayerSlots:
        """Each head's slots in order [B, Hkv, V (+1 sink slot)], as the uniform layout holds them: what scoring,
        staging and the dense reference read. ``used`` [B]: the rows' uniform slot counts."""
        source, held = self.sources(used)
        batch, heads, length = source.shape
        flat = source.flatten(1)

        def gathered(tensor: Tensor | None) -> Tensor | None:
            if tensor is None:
                return None
            pool = tensor[:, 0]
            index = flat.view(*flat.shape, *(1,) * (pool.dim() - 2)).expand(-1, -1, *pool.shape[2:])
            view = pool.gather(1, index).view(batch, heads, length, *pool.shape[2:])
            if self.sinks:  # the sink slot, last, as in the uniform layout
                view = torch.cat([view, view.new_zeros(batch, heads, 1, *pool.shape[2:])], dim=2)
            return view

        valid = gathered(self.valid)
        valid[:, :, :length] &= held
        return LayerSlots(
            keys=gathered(self.keys),
            values=gathered(self.values),
            valid=valid,
            pos=gathered(self.pos),
            queries=self.queries,
            attention_sum=gathered(self.attention_sum),
            sinks=self.sinks,
        )

    def add_view_attention(self, used: Tensor, received: Tensor) -> None:
        source, held = self.sources(used)
        attention = (received[:, :, : held.shape[2]] * held).flatten(1)
        put_along(self.attention_sum, 2, source.flatten(1)[:, None], attention[:, None], accumulate=True)

    # -- compaction ---------------------------------------------------------------------------------------------
    def repack(self, source: SlotState, keep: Tensor, rows: Tensor | None = None, fed: Tensor | None = None) -> None:
        """Keep the slots ``keep`` [B', Hkv, S] of the per-head ``source`` [B', Hkv, S]: each head's kept slots
        become its segment's first ones (in order), followed by ``buffer`` free slots; ``rows`` [B'] says which rows
        ``source`` holds (None: all), ``fed`` [B'] which of them change (None: all)."""
        length = keep.shape[-1]
        kept = keep.sum(dim=-1)
        segment = kept + self.buffer
        start = segment.cumsum(dim=-1) - segment
        index = torch.arange(length, device=keep.device)
        order = torch.where(keep, index, length + index).argsort(dim=-1)  # kept slots first, in order
        slot = torch.arange(self.token_slots, device=keep.device)
        owner = (slot >= start[..., None]).sum(dim=1) - 1  # [B', P]
        offset = slot - start.gather(1, owner)
        taken = offset < kept.gather(1, owner)
        picked = order.flatten(1).gather(1, owner * length + offset.clamp(max=length - 1))
        flat = owner * length + picked  # [B', P] into the source's [B', Hkv * S]

        def packed(tensor: Tensor) -> Tensor:
            values = tensor.flatten(1, 2)
            index = flat.view(*flat.shape, *(1,) * (values.dim() - 2)).expand(-1, -1, *values.shape[2:])
            return values.gather(1, index)

        updates = {"keys": packed(source.keys), "values": packed(source.values), "pos": packed(source.pos)}
        updates["valid"] = taken
        if self.attention_sum is not None:
            updates["attention_sum"] = packed(source.attention_sum) * taken
        for name, front in updates.items():
            write_rows(getattr(self, name), front, rows, (0, slice(None, self.token_slots)), fed)
        write_rows(self.start, start, rows, (), fed)
        write_rows(self.kept, kept, rows, (), fed)
