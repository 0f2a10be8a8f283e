"""Slot storage: the tensors one decoder layer keeps, and the per-row counters every layer shares.

A layer allocates ``capacity`` slots of K and V per sequence (row) and KV head once, with the absolute position and
the validity of every slot, and a ring of the last ``window`` post-RoPE queries. Everything is written in place, so
addresses and shapes never change: the decode step and the compaction step each compile to one static graph.

Writes come in two forms. Eager forwards of a batch in lockstep know where to write on the host and copy into a
slice. Compiled decode steps (and rows at different fill levels) write one token per row at the row's own ``used``
count, a device tensor, so no host value enters the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .policies import SlotState


def static(tensor: Tensor) -> Tensor:
    """Mark a persistent buffer as having a fixed address (what CUDA graphs need)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


def record_queries(ring_buffer: Tensor, query: Tensor, ring: int | Tensor) -> None:
    """Keep the last ``min(L, W)`` queries [B, Hq, L, D] in the ring [B, Hq, W, D], the first at index ``ring``: a
    host int (rows in lockstep) or a [B] tensor (one query per row)."""
    window = ring_buffer.shape[2]
    if isinstance(ring, Tensor):
        at = ring.view(-1, 1, 1, 1).expand(-1, query.shape[1], 1, query.shape[-1])
        ring_buffer.scatter_(2, at, query[:, :, -1:])
        return
    kept = min(query.shape[2], window)
    if ring + kept <= window:
        ring_buffer[:, :, ring : ring + kept].copy_(query[:, :, -kept:])
    else:
        index = torch.arange(ring, ring + kept, device=query.device) % window
        ring_buffer.index_copy_(2, index, query[:, :, -kept:])


@dataclass
class RowCounters:
    """Per-row state shared by all layers: every layer holds the same tokens' count."""

    used: Tensor  # [B] int64: slots used
    seen: Tensor  # [B] int64: tokens fed (padding included), the next query ring index is seen % window
    query_valid: Tensor  # [B, W] bool: ring entries that hold a real token's queries

    @classmethod
    def allocate(cls, batch: int, window: int, device: torch.device) -> RowCounters:
        return cls(
            used=static(torch.zeros(batch, dtype=torch.long, device=device)),
            seen=static(torch.zeros(batch, dtype=torch.long, device=device)),
            query_valid=static(torch.zeros(batch, window, dtype=torch.bool, device=device)),
        )

    def narrow(self, rows: slice) -> RowCounters:
        return RowCounters(self.used[rows], self.seen[rows], self.query_valid[rows])

    def reorder(self, index: Tensor) -> None:
        for tensor in (self.used, self.seen, self.query_valid):
            tensor.copy_(tensor.index_select(0, index))


class LayerSlots:
    """One decoder layer's slots: ``keys`` [B, Hkv, C, D], ``values`` [B, Hkv, C, Dv], ``valid``/``pos`` [B, Hkv, C],
    the query ring ``queries`` [B, Hq, W, D] and, for policies that track it, ``attention_sum`` [B, Hkv, C]."""

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        valid: Tensor,
        pos: Tensor,
        queries: Tensor,
        attention_sum: Tensor | None,
    ):
        self.keys, self.values, self.valid, self.pos = keys, values, valid, pos
        self.queries, self.attention_sum = queries, attention_sum

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
    ) -> LayerSlots:
        slots = (batch, kv_heads, capacity)
        return cls(
            keys=static(torch.zeros(*slots, key_dim, dtype=dtype, device=device)),
            values=static(torch.zeros(*slots, value_dim, dtype=dtype, device=device)),
            valid=static(torch.zeros(slots, dtype=torch.bool, device=device)),
            pos=static(torch.zeros(slots, dtype=torch.long, device=device)),
            queries=static(torch.zeros(batch, query_heads, window, key_dim, dtype=dtype, device=device)),
            attention_sum=static(torch.zeros(slots, dtype=torch.float32, device=device)) if tracks_attention else None,
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> dict[str, Tensor | None]:
        return {
            "keys": self.keys,
            "values": self.values,
            "valid": self.valid,
            "pos": self.pos,
            "queries": self.queries,
            "attention_sum": self.attention_sum,
        }

    def narrow(self, rows: slice) -> LayerSlots:
        """A view of some rows: writes through it land in these slots."""
        return LayerSlots(**{name: None if t is None else t[rows] for name, t in self.tensors().items()})

    # -- writing ------------------------------------------------------------------------------------------------
    def append(self, keys: Tensor, values: Tensor, positions: Tensor, new_valid: Tensor | None, offset: int) -> None:
        """Write L new tokens of every row at slots ``offset .. offset + L`` (rows in lockstep, eager)."""
        end = offset + keys.shape[2]
        self.keys[:, :, offset:end].copy_(keys)
        self.values[:, :, offset:end].copy_(values)
        self.pos[:, :, offset:end].copy_(positions[:, None, :])
        if new_valid is None:
            self.valid[:, :, offset:end] = True
        else:
            self.valid[:, :, offset:end].copy_(new_valid[:, None, :])
        if self.attention_sum is not None:
            self.attention_sum[:, :, offset:end] = 0.0

    def append_rows(self, keys: Tensor, values: Tensor, positions: Tensor, slot: Tensor) -> None:
        """Write one new token per row at that row's slot ``slot`` [B] (a device tensor: no host value)."""
        batch, kv_heads = keys.shape[:2]
        at = slot.view(batch, 1, 1).expand(batch, kv_heads, 1)
        self.keys.scatter_(2, at[..., None].expand(-1, -1, -1, keys.shape[-1]), keys)
        self.values.scatter_(2, at[..., None].expand(-1, -1, -1, values.shape[-1]), values)
        self.pos.scatter_(2, at, positions[:, None, :].expand(batch, kv_heads, 1))
        self.valid.scatter_(2, at, True)
        if self.attention_sum is not None:
            self.attention_sum.scatter_(2, at, 0.0)

    def record_queries(self, query: Tensor, ring: int | Tensor) -> None:
        record_queries(self.queries, query, ring)

    # -- reading ------------------------------------------------------------------------------------------------
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

    def staged(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        new_valid: Tensor,
        length: int,
        used: int | Tensor,
        query_valid: Tensor,
        scaling: float,
        softcap: float | None = None,
    ) -> SlotState:
        """The slots followed by new tokens, padded with invalid ones to ``length`` new columns (so the shapes
        attention and selection compile for come from a few buckets). ``window`` marks the newest tokens: the new
        ones, and when they are fewer than the window, the newest of the ``used`` slots too (``used``: a host int, or
        [B, Hkv] per row and head)."""
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
        in_window = (slot >= max(newest - window, self.capacity)) & (slot < newest)
        if isinstance(used, Tensor):  # per row and head [B, Hkv] (a pooled layer's per-head view)
            used = used[..., None]
            in_window = in_window | ((slot >= used - (window - count)) & (slot < used.clamp(max=self.capacity)))
            window_shape = in_window.shape
        else:
            in_window |= (slot >= used - (window - count)) & (slot < min(used, self.capacity))
            window_shape = (batch, 1, total)
        return SlotState(
            keys=joined(self.keys, keys, 0.0),
            values=joined(self.values, values, 0.0),
            valid=joined(self.valid, valid, False),
            pos=joined(self.pos, new_pos, -1),
            window=in_window.expand(window_shape),
            queries=self.queries,
            query_valid=query_valid,
            attention_sum=attention_sum,
            scaling=scaling,
            softcap=softcap,
        )

    # -- compaction -------------------------------------------------------------------------------------------
    def keep(self, source: SlotState, kept: Tensor, rows: Tensor | None = None) -> None:
        """Move the slots ``kept`` [B', Hkv, K] of ``source`` to the front (in order) and free the rest; ``rows``
        [B'] says which rows ``source`` holds (None: all)."""
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
            tensor = getattr(self, name)
            if rows is None:
                tensor[:, :, :count].copy_(front)
                continue
            whole = tensor.index_select(0, rows)
            whole[:, :, :count] = front
            tensor.index_copy_(0, rows, whole)
        if rows is None:
            self.valid[:, :, count:] = False
        else:
            valid = self.valid.index_select(0, rows)
            valid[:, :, count:] = False
            self.valid.index_copy_(0, rows, valid)

    # -- whole-buffer changes -----------------------------------------------------------------------------------
    def grown(self, capacity: int) -> LayerSlots:
        """A copy with more slots (for policies that never evict)."""

        def wider(tensor: Tensor | None) -> Tensor | None:
            if tensor is None:
                return None
            shape = list(tensor.shape)
            shape[2] = capacity - shape[2]
            return static(torch.cat([tensor, tensor.new_zeros(shape)], dim=2))

        grown = {name: wider(t) for name, t in self.tensors().items() if name != "queries"}
        return LayerSlots(queries=self.queries, **grown)

    def reorder(self, index: Tensor) -> None:
        """Row ``i`` takes the state of row ``index[i]`` (beam search)."""
        for tensor in self.tensors().values():
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, index))

    def reset(self, rows: slice = slice(None)) -> None:
        """Forget what some rows hold."""
        self.valid[rows] = False
        if self.attention_sum is not None:
            self.attention_sum[rows] = 0.0
