"""One request's slots inside vLLM's paged KV cache, and their compaction in place.

A layer's cache is seen here as ``keys`` and ``values`` of shape [num_blocks, Hkv, block_size, D] (views of vLLM's
tensor, so writes land in it). A request's slot ``s`` of KV head ``h`` is ``[block_ids[s // block_size], h,
s % block_size]``. Compaction reads a request's slots, scores them with rkv_flex's own policies (the same code as the
transformers path) and writes each head's kept slots to the front of that request's own pages, in order. Every head
keeps the same number, so the request's tail blocks hold nothing afterwards and vLLM's scheduler can free them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..policies import Policy, SlotState
from ..scoring import select_keep


def slot_addresses(block_ids: Tensor, count: int, block_size: int) -> tuple[Tensor, Tensor]:
    """(block, offset) [count] of a request's first ``count`` slots."""
    slot = torch.arange(count, device=block_ids.device)
    return block_ids[slot // block_size], slot % block_size


def read_slots(cache: Tensor, block_ids: Tensor, count: int) -> Tensor:
    """[Hkv, count, D]: a request's first ``count`` slots of one layer's keys or values."""
    blocks, offsets = slot_addresses(block_ids, count, cache.shape[2])
    return cache[blocks, :, offsets].transpose(0, 1)


def write_slots(cache: Tensor, block_ids: Tensor, slots: Tensor) -> None:
    """Write ``slots`` [Hkv, count, D] as a request's first ``count`` slots of one layer."""
    blocks, offsets = slot_addresses(block_ids, slots.shape[1], cache.shape[2])
    cache[blocks, :, offsets] = slots.transpose(0, 1)


def compact_slots(
    policy: Policy,
    keys: Tensor,
    values: Tensor,
    block_ids: Tensor,
    held: int,
    positions: Tensor,
    queries: Tensor,
    query_valid: Tensor,
    budget: int,
    window: int,
    scaling: float,
) -> Tensor:
    """Keep ``budget`` of a request's ``held`` slots in one layer: the ``window`` newest and the policy's best of
    the rest, each head's in order at the front of its pages. ``positions`` [Hkv, held] are the slots' token
    positions, ``queries`` [Hq, W, D] the request's newest queries (``query_valid`` [W]). Returns the kept
    positions [Hkv, budget]."""
    slot_keys = read_slots(keys, block_ids, held)[None]
    slot_values = read_slots(values, block_ids, held)[None]
    valid = torch.ones(slot_keys.shape[:3], dtype=torch.bool, device=keys.device)
    newest = (torch.arange(held, device=keys.device) >= held - window)[None, None]
    state = SlotState(
        keys=slot_keys.float(),
        values=slot_values.float(),
        valid=valid,
        pos=positions[None],
        window=newest,
        queries=queries[None].float(),
        query_valid=query_valid[None],
        scaling=scaling,
    )
    kept = select_keep(policy(state), valid, newest.expand_as(valid), budget)[0]  # [Hkv, budget]
    by_dim = kept[..., None].expand(-1, -1, slot_keys.shape[-1])
    write_slots(keys, block_ids, slot_keys[0].gather(1, by_dim))
    write_slots(values, block_ids, slot_values[0].gather(1, by_dim))
    return positions.gather(1, kept)
