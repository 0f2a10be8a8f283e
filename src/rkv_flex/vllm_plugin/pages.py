"""One request's slots inside vLLM's paged KV cache, and their compaction in place.

vLLM's CPU cache of one layer is [num_blocks, Hkv, block_size, 2 * D]: for each (block, KV head) a slab of
``block_size * 2 * D`` elements, keys in the first half and values in the second, each in an order that depends on the
CPU's instruction set. A :class:`PageLayout` says where token ``t``'s channel ``d`` lies in a slab (vLLM's own write
op is probed for it, ``plugin.probe_layout``). A request's slot ``s`` is token ``s % block_size`` of block
``block_ids[s // block_size]``.

Compaction reads a request's slots, scores them with rkv_flex's own policies (the transformers path's code) and
writes each head's kept slots to the front of that request's own pages, in order. Every head keeps the same number,
so the request's tail blocks hold nothing afterwards and vLLM's scheduler can give them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..policies import Policy, SlotState
from ..scoring import select_keep


@dataclass(frozen=True)
class PageLayout:
    """Offsets [block_size, D] of each token's key and value channels in a (block, KV head) slab."""

    keys: Tensor
    values: Tensor

    @classmethod
    def plain(cls, block_size: int, dim: int) -> PageLayout:
        """Keys then values, each token's channels contiguous."""
        offsets = torch.arange(block_size * dim).view(block_size, dim)
        return cls(offsets, offsets + block_size * dim)

    @property
    def block_size(self) -> int:
        return self.keys.shape[0]


def slabs(cache: Tensor) -> Tensor:
    """[num_blocks, Hkv, block_size * 2 * D]: a view of one layer's cache, writes land in it."""
    return cache.view(cache.shape[0], cache.shape[1], -1)


def _addresses(layout: PageLayout, block_ids: Tensor, count: int, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    slot = torch.arange(count)
    block = block_ids.to(torch.long)[slot // layout.block_size]
    return block[None, :, None], torch.arange(heads)[:, None, None], slot % layout.block_size


def read_slots(pages: Tensor, layout: PageLayout, block_ids: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Keys and values [Hkv, count, D] of a request's first ``count`` slots (``pages``: :func:`slabs`)."""
    block, head, token = _addresses(layout, block_ids, count, pages.shape[1])
    return pages[block, head, layout.keys[token][None]], pages[block, head, layout.values[token][None]]


def write_slots(pages: Tensor, layout: PageLayout, block_ids: Tensor, keys: Tensor, values: Tensor) -> None:
    """Write ``keys`` and ``values`` [Hkv, count, D] as a request's first ``count`` slots."""
    block, head, token = _addresses(layout, block_ids, keys.shape[1], pages.shape[1])
    pages[block, head, layout.keys[token][None]] = keys
    pages[block, head, layout.values[token][None]] = values


def compact_slots(
    policy: Policy,
    pages: Tensor,
    layout: PageLayout,
    block_ids: Tensor,
    positions: Tensor,
    queries: Tensor,
    query_valid: Tensor,
    budget: int,
    window: int,
    scaling: float,
) -> Tensor:
    """Keep ``budget`` of a request's slots in one layer: the ``window`` newest and the policy's best of the rest,
    each head's in order at the front of its pages. ``positions`` [Hkv, held] are the held slots' token positions,
    ``queries`` [Hq, W, D] the request's newest post-RoPE queries (``query_valid`` [W]). Returns the kept
    positions [Hkv, budget]."""
    held = positions.shape[1]
    keys, values = read_slots(pages, layout, block_ids, held)
    valid = torch.ones(keys.shape[:2], dtype=torch.bool)[None]
    newest = (torch.arange(held) >= held - window).expand_as(valid)
    state = SlotState(
        keys=keys[None].float(),
        values=values[None].float(),
        valid=valid,
        pos=positions[None],
        window=newest[:, :1],
        queries=queries[None].float(),
        query_valid=query_valid[None],
        scaling=scaling,
    )
    kept = select_keep(policy(state), valid, newest, budget)[0]  # [Hkv, budget], each head's in slot order
    by_dim = kept[..., None].expand(-1, -1, keys.shape[-1])
    write_slots(pages, layout, block_ids, keys.gather(1, by_dim), values.gather(1, by_dim))
    return positions.gather(1, kept)
