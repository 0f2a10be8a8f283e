"""Slot storage: the tensors one decoder layer keeps, and the per-row counters every layer shares.

A layer allocates its slots once: K and V per sequence (row), with the absolute position and the validity of every
slot, and a ring of the last ``window`` post-RoPE queries. Everything is written in place, so addresses and shapes
never change: the decode step and the compaction step each compile to one static graph.

Two layouts implement one protocol (:class:`SlotStorage`), so the cache layer never asks which it holds:

* :class:`LayerSlots` (uniform budgets): ``capacity`` slots per KV head, [B, Hkv, C, D];
* :class:`~rkv_flex.pool.PooledSlots` (head-adaptive budgets): one pool per row shared by the KV heads, each head
  owning a segment of it, [B, 1, P, D].

Both present a per-head view for scoring, staging and the dense reference (``heads``), the slots each KV head may
read (``allowed``), and their own selection and write-back at compaction (``keep_best``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .masks import window_mask
from .policies import Policy, SlotState
from .scoring import select_keep

if TYPE_CHECKING:
    from .config import RKVConfig
    from .kernels import Segments
    from .planner import Plan


def static(tensor: Tensor) -> Tensor:
    """Mark a persistent buffer as having a fixed address (what CUDA graphs need)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


def put_along(
    tensor: Tensor, dim: int, index: Tensor, new: Tensor, fed: Tensor | None = None, accumulate: bool = False
) -> None:
    """``tensor[..., index, ...] = new`` along ``dim``, in place: ``index`` has ``tensor``'s leading dims (or 1, to
    broadcast) and the entries written along ``dim``, ``new`` is [*index.shape, *tensor.shape[dim + 1:]]. With
    ``fed`` [B], rows not fed keep what they hold.

    Eagerly this is ``scatter_`` (``scatter_add_`` with ``accumulate``). Traced, it is ``index_put_``, because inductor
    updates an input in place for ``index_put_`` but copies the whole tensor for ``scatter_`` (torch 2.13 does not
    re-inplace it): a compiled decoding step that wrote its token by ``scatter_`` copied every layer's slots, twice.
    Eager ``index_put_`` costs several times ``scatter_`` for these small writes."""
    expanded = index.view(*index.shape, *(1,) * (new.dim() - index.dim())).expand_as(new)
    if fed is not None:
        new = torch.where(fed.view(-1, *(1,) * (new.dim() - 1)), new, tensor.gather(dim, expanded))
    if not torch.compiler.is_compiling():
        (tensor.scatter_add_ if accumulate else tensor.scatter_)(dim, expanded, new)
        return
    leading = [
        torch.arange(size, device=index.device).view(*(1 if d != axis else size for d in range(index.dim())))
        for axis, size in enumerate(tensor.shape[:dim])
    ]
    tensor.index_put_((*leading, index), new, accumulate=accumulate)


def record_queries(ring_buffer: Tensor, query: Tensor, ring: int | Tensor, fed: Tensor | None = None) -> None:
    """Keep the last ``min(L, W)`` queries [B, Hq, L, D] in the ring [B, Hq, W, D], the first at index ``ring``: a
    host int (rows in lockstep) or a [B] tensor (one query per row, and only for the rows ``fed`` [B])."""
    window = ring_buffer.shape[2]
    if isinstance(ring, Tensor):
        put_along(ring_buffer, 2, ring.view(-1, 1, 1), query[:, :, -1:], fed)
        return
    kept = min(query.shape[2], window)
    if ring + kept <= window:
        ring_buffer[:, :, ring : ring + kept].copy_(query[:, :, -kept:])
    else:
        index = torch.arange(ring, ring + kept, device=query.device) % window
        ring_buffer.index_copy_(2, index, query[:, :, -kept:])


def write_rows(tensor: Tensor, front: Tensor, rows: Tensor | None, region: tuple, fed: Tensor | None = None) -> None:
    """``tensor[rows][region] = front`` in place (``rows`` None: every row), for the rows ``fed`` [B'] only."""
    whole = tensor if rows is None else tensor.index_select(0, rows)
    part = whole[(slice(None), *region)]
    if fed is not None:
        front = torch.where(fed.view(-1, *(1,) * (front.dim() - 1)), front, part)
    part.copy_(front)
    if rows is not None:
        tensor.index_copy_(0, rows, whole)


@torch.compiler.nested_compile_region
def select_region(policy: Policy, keep: int, state: SlotState) -> Tensor:
    """One layer's kept slots (uniform): a region compiled once and reused by every layer of a traced compaction (a
    30-layer model otherwise compiles 30 copies of the same scoring kernels); a plain call when eager."""
    return select_keep(policy(state), state.valid, state.window, keep)


@dataclass
class RowCounters:
    """Per-row state shared by all layers: every layer holds the same tokens' count."""

    used: Tensor  # [B] int64: slots used (by the uniform count)
    seen: Tensor  # [B] int64: tokens fed (padding included), the next query ring index is seen % window
    query_valid: Tensor  # [B, W] bool: ring entries that hold a real token's queries
    fed: Tensor  # [B] bool: the rows a decoding step feeds (an engine's finished or idle rows keep their state)

    @classmethod
    def allocate(cls, batch: int, window: int, device: torch.device) -> RowCounters:
        return cls(
            used=static(torch.zeros(batch, dtype=torch.long, device=device)),
            seen=static(torch.zeros(batch, dtype=torch.long, device=device)),
            query_valid=static(torch.zeros(batch, window, dtype=torch.bool, device=device)),
            fed=static(torch.ones(batch, dtype=torch.bool, device=device)),
        )

    def narrow(self, rows: slice) -> RowCounters:
        return RowCounters(self.used[rows], self.seen[rows], self.query_valid[rows], self.fed[rows])

    def reorder(self, index: Tensor) -> None:
        for tensor in (self.used, self.seen, self.query_valid, self.fed):
            tensor.copy_(tensor.index_select(0, index))

    def advance_one(self) -> None:
        """Every fed row takes one token: a decoding step (the same on the device, traced or eager)."""
        self.used.add_(self.fed)
        self.seen.add_(self.fed)
        ring = ((self.seen - 1) % self.query_valid.shape[1])[:, None]
        put_along(self.query_valid, 1, ring, self.query_valid.gather(1, ring) | self.fed[:, None])


class SlotStorage(ABC):
    """What a layer's slots offer the cache layer, whatever their layout. Tensors common to both layouts: ``keys``,
    ``values``, ``valid``, ``pos``, the query ring ``queries`` [B, Hq, W, D] and, for policies that track it,
    ``attention_sum``."""

    keys: Tensor
    values: Tensor
    valid: Tensor
    pos: Tensor
    queries: Tensor
    attention_sum: Tensor | None
    sinks: bool  # the last slot carries the model's attention sinks and never holds a token
    uniform: bool  # every KV head has its own slots, in order: the used ones are a prefix of each head's
    selects = True  # compaction chooses what stays (a sliding-window ring holds exactly what its layer can read)

    # -- what both layouts share ---------------------------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> dict[str, Tensor | None]: ...

    @abstractmethod
    def _with(self, tensors: dict[str, Tensor | None]) -> SlotStorage: ...

    def narrow(self, rows: slice) -> SlotStorage:
        """A view of some rows: writes through it land in these slots."""
        return self._with({name: None if t is None else t[rows] for name, t in self.tensors().items()})

    def reorder(self, index: Tensor) -> None:
        """Row ``i`` takes the state of row ``index[i]`` (beam search)."""
        for tensor in self.tensors().values():
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, index))

    def record_queries(self, query: Tensor, ring: int | Tensor, fed: Tensor | None = None) -> None:
        record_queries(self.queries, query, ring, fed)

    @property
    def capacity(self) -> int:
        """Slots in the stored tensors (the sink slot included, last)."""
        return self.keys.shape[2]

    @property
    def sink_slot(self) -> int | None:
        return self.capacity - 1 if self.sinks else None

    @property
    def values_in_keys(self) -> bool:
        """The values are the keys' first channels (an MLA latent), not a tensor of their own."""
        return self.values.untyped_storage().data_ptr() == self.keys.untyped_storage().data_ptr()

    @property
    def kv_bytes(self) -> int:
        return self.keys.nbytes + (0 if self.values_in_keys else self.values.nbytes)

    # -- what each layout does its own way ----------------------------------------------------------------------
    @abstractmethod
    def heads(self, used: Tensor) -> LayerSlots:
        """Each KV head's slots in order, [B, Hkv, V, ...] (V: ``view_capacity``), when the rows hold ``used`` [B]."""

    @property
    @abstractmethod
    def view_capacity(self) -> int:
        """Slots per head of :meth:`heads` (the sink slot included, last)."""

    @abstractmethod
    def allowed(self) -> Tensor:
        """[B, Hkv, S]: the stored slots each KV head may read (valid, and its own)."""

    @property
    @abstractmethod
    def segments(self) -> Segments | None:
        """Where each KV head's slots are in a shared pool (None: every head has its own)."""

    @abstractmethod
    def per_head(self, tensor: Tensor) -> Tensor:
        """A stored-slot tensor [B, Hkv or 1, S, ...] as one per KV head."""

    @abstractmethod
    def add_attention(self, received: Tensor) -> None:
        """Accumulate attention [B, Hkv, S] received by the stored slots (zero where a head may not read)."""

    @abstractmethod
    def add_view_attention(self, used: Tensor, received: Tensor) -> None:
        """Accumulate attention [B, Hkv, V] received by the slots of :meth:`heads` at ``used``."""

    @abstractmethod
    def append(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        new_valid: Tensor | None,
        offset: int,
        attention: Tensor | None = None,
    ) -> None:
        """Write L new tokens of every row and KV head [B, Hkv, L, D] after ``offset`` slots (uniform count), with
        the attention they already received [B, Hkv, L] (tracked policies; default none)."""

    def step_slot(self, counters: RowCounters) -> Tensor:
        """[B]: where a decoding step writes each row's token (after the counters advanced)."""
        return counters.used - 1

    def host_step_slot(self, plan: Plan) -> int | None:
        """Where a decoding step of rows in lockstep writes every row's token, as the host knows it (None: the
        layout has no one slot for all rows)."""
        return plan.used_before[0] if self.uniform else None

    def commit_span(self, policy: Policy, config: RKVConfig, staged: SlotState, plan: Plan) -> None:
        """After a span's attention over ``staged`` (the heads' slots then the new tokens): append the new tokens,
        or, when the plan staged them because they overflow the slots, keep ``budget`` of everything."""
        if plan.staged:
            self.keep_best(policy, config, staged, None, None)
            return
        count = plan.length
        new = slice(self.view_capacity, self.view_capacity + count)
        attention = None if staged.attention_sum is None else staged.attention_sum[:, :, new]
        new_pos, new_valid = staged.pos[:, 0, new], staged.valid[:, 0, new]
        self.append(staged.keys[:, :, new], staged.values[:, :, new], new_pos, new_valid, plan.offset, attention)

    @abstractmethod
    def append_rows(self, keys: Tensor, values: Tensor, positions: Tensor, slot: Tensor, fed: Tensor) -> None:
        """Write one new token per row [B, Hkv, 1, D] at that row's slot ``slot`` [B] (uniform count; a device
        tensor, so no host value enters a traced step), for the rows ``fed`` [B] only."""

    @abstractmethod
    def keep_best(
        self, policy: Policy, config: RKVConfig, state: SlotState, rows: Tensor | None, fed: Tensor | None
    ) -> None:
        """Compaction: select from the per-head ``state`` (of ``rows``, None: all) what the layout keeps, and keep
        only that, each head's slots in order, in the rows ``fed`` [B'] (the others stay as they are)."""

    @abstractmethod
    def reset(self, rows: slice = slice(None)) -> None:
        """Forget what some rows hold."""

    def scoring_state(
        self, used: Tensor, window: int, query_valid: Tensor, scaling: float, softcap: float | None
    ) -> SlotState:
        """The per-head view as a policy scores it at compaction: the ``window`` newest slots of each head marked."""
        view = self.heads(used)
        held = self.occupancy(used)
        slot = torch.arange(view.capacity, device=used.device)
        newest = (slot >= held[..., None] - window) & (slot < held[..., None])
        return view.state(newest, query_valid, scaling, softcap)

    @abstractmethod
    def occupancy(self, used: Tensor) -> Tensor:
        """[B, 1 or Hkv]: slots each head holds when its row has ``used`` [B] by the uniform count."""

    def grown(self, capacity: int) -> SlotStorage:
        raise NotImplementedError(f"{type(self).__name__} has a fixed size")


class LayerSlots(SlotStorage):
    """One decoder layer's slots, ``capacity`` per KV head: ``keys`` [B, Hkv, C, D], ``values`` [B, Hkv, C, Dv],
    ``valid``/``pos`` [B, Hkv, C], the query ring ``queries`` [B, Hq, W, D] and, for policies that track it,
    ``attention_sum`` [B, Hkv, C]. Also the per-head view every layout presents."""

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        valid: Tensor,
        pos: Tensor,
        queries: Tensor,
        attention_sum: Tensor | None,
        sinks: bool = False,
    ):
        self.keys, self.values, self.valid, self.pos = keys, values, valid, pos
        self.queries, self.attention_sum, self.sinks = queries, attention_sum, sinks

    @classmethod
    def allocate(
        cls,
        batch: int,
        kv_heads: int,
        query_heads: int,
        capacity: int,
        window: int,
        key_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tracks_attention: bool,
        sinks: bool = False,
        values_in_keys: bool = False,
    ) -> LayerSlots:
        slots = (batch, kv_heads, capacity + sinks)
        keys = static(torch.zeros(*slots, key_dim, dtype=dtype, device=device))
        return cls(
            keys=keys,
            values=keys[..., :value_dim]
            if values_in_keys
            else static(torch.zeros(*slots, value_dim, dtype=dtype, device=device)),
            valid=static(torch.zeros(slots, dtype=torch.bool, device=device)),
            pos=static(torch.zeros(slots, dtype=torch.long, device=device)),
            queries=static(torch.zeros(batch, query_heads, window, key_dim, dtype=dtype, device=device)),
            attention_sum=static(torch.zeros(slots, dtype=torch.float32, device=device)) if tracks_attention else None,
            sinks=sinks,
        )

    def tensors(self) -> dict[str, Tensor | None]:
        return {
            "keys": self.keys,
            "values": self.values,
            "valid": self.valid,
            "pos": self.pos,
            "queries": self.queries,
            "attention_sum": self.attention_sum,
        }

    def _with(self, tensors: dict[str, Any]) -> LayerSlots:
        return type(self)(**tensors, sinks=self.sinks)

    # -- the protocol ---------------------------------------------------------------------------------------------
    uniform = True

    def heads(self, used: Tensor) -> LayerSlots:
        return self

    @property
    def view_capacity(self) -> int:
        return self.capacity

    def allowed(self) -> Tensor:
        return self.valid

    @property
    def segments(self) -> None:
        return None

    def per_head(self, tensor: Tensor) -> Tensor:
        return tensor

    def occupancy(self, used: Tensor) -> Tensor:
        return used[:, None]

    def add_attention(self, received: Tensor) -> None:
        self.attention_sum += received

    def add_view_attention(self, used: Tensor, received: Tensor) -> None:
        self.attention_sum += received[:, :, : self.capacity]

    def append(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        new_valid: Tensor | None,
        offset: int,
        attention: Tensor | None = None,
    ) -> None:
        end = offset + keys.shape[2]
        self.keys[:, :, offset:end].copy_(keys)
        self.values[:, :, offset:end].copy_(values)
        self.pos[:, :, offset:end].copy_(positions[:, None, :])
        if new_valid is None:
            self.valid[:, :, offset:end] = True
        else:
            self.valid[:, :, offset:end].copy_(new_valid[:, None, :])
        if self.attention_sum is not None:
            self.attention_sum[:, :, offset:end] = 0.0 if attention is None else attention

    def append_rows(self, keys: Tensor, values: Tensor, positions: Tensor, slot: Tensor, fed: Tensor) -> None:
        batch, kv_heads = keys.shape[:2]
        at = slot.clamp(min=0).view(batch, 1, 1).expand(batch, kv_heads, 1)
        put_along(self.keys, 2, at, keys, fed)
        put_along(self.values, 2, at, values, fed)
        put_along(self.pos, 2, at, positions[:, None, :].expand(batch, kv_heads, 1), fed)
        put_along(self.valid, 2, at, torch.ones_like(at, dtype=torch.bool), fed)
        if self.attention_sum is not None:
            put_along(self.attention_sum, 2, at, torch.zeros_like(at, dtype=self.attention_sum.dtype), fed)

    def keep_best(
        self, policy: Policy, config: RKVConfig, state: SlotState, rows: Tensor | None, fed: Tensor | None
    ) -> None:
        self.keep(state, select_region(policy, config.budget, state), rows, fed)

    def reset(self, rows: slice = slice(None)) -> None:
        self.valid[rows] = False
        if self.attention_sum is not None:
            self.attention_sum[rows] = 0.0

    def grown(self, capacity: int) -> LayerSlots:
        """A copy with more slots (for policies that never evict)."""

        def wider(tensor: Tensor | None) -> Tensor | None:
            if tensor is None:
                return None
            shape = list(tensor.shape)
            shape[2] = capacity - shape[2]
            return static(torch.cat([tensor, tensor.new_zeros(shape)], dim=2))

        grown = {name: wider(t) for name, t in self.tensors().items() if name not in ("queries", "values")}
        values = grown["keys"][..., : self.values.shape[-1]] if self.values_in_keys else wider(self.values)
        return LayerSlots(queries=self.queries, sinks=self.sinks, values=values, **grown)

    # -- what the per-head view offers ---------------------------------------------------------------------------
    def state(self, window: Tensor, query_valid: Tensor, scaling: float, softcap: float | None = None) -> SlotState:
        """The slots as a policy sees them."""
        return SlotState(
            self.keys,
            self.values,
            self.valid,
            self.pos,
            window,
            self.queries,
            query_valid,
            self.attention_sum,
            scaling,
            softcap,
        )

    def window_state(
        self, used: Tensor, window: int, query_valid: Tensor, scaling: float, softcap: float | None = None
    ) -> SlotState:
        """:meth:`state` with the ``window`` newest of ``used`` [B] slots marked."""
        return self.state(window_mask(used, self.capacity, window), query_valid, scaling, softcap)

    def staged(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        new_valid: Tensor,
        length: int,
        used: Tensor,
        query_valid: Tensor,
        scaling: float,
        softcap: float | None = None,
    ) -> SlotState:
        """The slots followed by new tokens, padded with invalid ones to ``length`` new columns (so the shapes
        attention and selection compile for come from a few buckets). ``window`` marks the newest tokens: the new
        ones, and when they are fewer than the window, the newest of the ``used`` [B, Hkv or 1] slots too."""
        batch, kv_heads, count = keys.shape[:3]
        pad = length - count

        def joined(slots: Tensor, new: Tensor, fill: float | bool) -> Tensor:
            padding = new.new_full((*new.shape[:2], pad, *new.shape[3:]), fill)
            return torch.cat([slots, new, padding], dim=2)

        new_pos = positions[:, None, :].expand(batch, kv_heads, count)
        valid = new_valid[:, None, :].expand(batch, kv_heads, count)
        attention_sum = None
        if self.attention_sum is not None:
            zeros = torch.zeros(batch, kv_heads, count, dtype=torch.float32, device=keys.device)
            attention_sum = joined(self.attention_sum, zeros, 0.0)
        total, window = self.capacity + length, self.queries.shape[2]
        slot = torch.arange(total, device=keys.device)
        newest = self.capacity + count
        used = used[..., None]
        in_window = (slot >= max(newest - window, self.capacity)) & (slot < newest)
        in_window = in_window | ((slot >= used - (window - count)) & (slot < used.clamp(max=self.capacity)))
        return SlotState(
            keys=joined(self.keys, keys, 0.0),
            values=joined(self.values, values, 0.0),
            valid=joined(self.valid, valid, False),
            pos=joined(self.pos, new_pos, -1),
            window=in_window,
            queries=self.queries,
            query_valid=query_valid,
            attention_sum=attention_sum,
            scaling=scaling,
            softcap=softcap,
        )

    def keep(self, source: SlotState, kept: Tensor, rows: Tensor | None = None, fed: Tensor | None = None) -> None:
        """Move the slots ``kept`` [B', Hkv, K] of ``source`` to the front (in order) and free the rest; ``rows``
        [B'] says which rows ``source`` holds (None: all), ``fed`` [B'] which of them change (None: all)."""
        count = kept.shape[-1]
        by_dim = kept[..., None]
        updates = {
            "keys": source.keys.gather(2, by_dim.expand(-1, -1, -1, source.keys.shape[-1])),
            "values": source.values.gather(2, by_dim.expand(-1, -1, -1, source.values.shape[-1])),
            "valid": source.valid.gather(2, kept),
            "pos": source.pos.gather(2, kept),
        }
        if self.attention_sum is not None:
            updates["attention_sum"] = source.attention_sum.gather(2, kept)
        for name, front in updates.items():
            write_rows(getattr(self, name), front, rows, (slice(None), slice(None, count)), fed)
        free = self.valid.new_zeros(kept.shape[0], *self.valid.shape[1:2], self.capacity - count)
        write_rows(self.valid, free, rows, (slice(None), slice(count, None)), fed)


class RingSlots(LayerSlots):
    """A sliding-window layer's slots: exactly its window (and the sink slot, last), token ``t`` of a row's stream
    at slot ``t % window``. Such a layer never reads further back, so there is nothing to score or choose: the ring
    is exact and spends none of the budget. Slots are not in position order; the slot rule reads positions."""

    uniform = False
    selects = False

    @property
    def ring(self) -> int:
        return self.capacity - self.sinks

    def step_slot(self, counters: RowCounters) -> Tensor:
        return (counters.seen - 1) % self.ring

    def host_step_slot(self, plan: Plan) -> int | None:
        return plan.seen_before[0] % self.ring

    def commit_span(self, policy: Policy, config: RKVConfig, staged: SlotState, plan: Plan) -> None:
        """The span's newest ``min(length, window)`` tokens go to their ring slots (padding as invalid slots)."""
        count = plan.length
        kept = min(count, self.ring)
        first = self.view_capacity + count - kept
        device = self.keys.device
        seen = torch.tensor(plan.seen_before, device=device)[:, None] + (count - kept)
        at = (seen + torch.arange(kept, device=device)) % self.ring  # [B, kept]
        batch, kv_heads = self.keys.shape[:2]
        index = at[:, None, :].expand(batch, kv_heads, kept)
        new = slice(first, first + kept)
        for name in ("keys", "values", "pos", "valid"):
            put_along(getattr(self, name), 2, index, getattr(staged, name)[:, :, new])

    def keep_best(
        self, policy: Policy, config: RKVConfig, state: SlotState, rows: Tensor | None, fed: Tensor | None
    ) -> None:
        """Nothing to choose: the ring already holds exactly the tokens the layer can read."""

    def grown(self, capacity: int) -> RingSlots:
        return self  # the window does not grow with the cache
