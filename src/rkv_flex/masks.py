"""Which cached slot a query may attend: one rule, as a flex mask_mod and as a dense boolean tensor.

A query at absolute position ``qpos`` sees slot ``s`` of KV head ``h`` when the slot holds a token (``valid``),
that token is not in its future (``pos <= qpos``) and, on sliding-window layers, not too far in its past
(``qpos - pos < sliding_window``). Padding, per-head retention and causality all come from this one rule, whatever
order the slots are in. Queries that are only padding of a bucket carry position -1 and see nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def slot_mask_mod(
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    group: int,
    sliding_window: int | None = None,
    rows_per_query: int = 1,
) -> MaskMod:
    """FlexAttention mask_mod over slot tensors ``valid``/``pos`` [B, Hkv, S] and ``query_pos`` [B, Lq].

    ``h`` is a query head; ``group`` query heads share one KV head. With the query group folded into the query
    length (``group=1``, ``h`` a KV head, and ``rows_per_query`` = G query rows per token), query row ``q_idx``
    belongs to token ``q_idx // rows_per_query``. The tensors are read at call time, so mutating them in place
    changes the mask without rebuilding anything.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        kv_head = h // group
        key_pos = pos[b, kv_head, kv_idx]
        q = query_pos[b, q_idx // rows_per_query]
        allowed = valid[b, kv_head, kv_idx] & (key_pos <= q)
        if sliding_window is not None:
            allowed = allowed & (q - key_pos < sliding_window)
        return allowed

    return mask_mod


def dense_slot_mask(valid: Tensor, pos: Tensor, query_pos: Tensor, sliding_window: int | None = None) -> Tensor:
    """The same rule as a boolean tensor [B, Hkv, Lq, S] (per KV head)."""
    key_pos = pos[:, :, None, :]
    q = query_pos[:, None, :, None]
    allowed = valid[:, :, None, :] & (key_pos <= q)
    if sliding_window is not None:
        allowed = allowed & (q - key_pos < sliding_window)
    return allowed


def window_mask(used: Tensor, length: int, window: int) -> Tensor:
    """Bool [B, 1, length]: per row, the ``window`` newest used slots ``[used - window, used)``."""
    slot = torch.arange(length, device=used.device)
    used = used[:, None, None]
    return (slot >= used - window) & (slot < used)


def block_tables(batch: int, query_length: int, kv_length: int, device: torch.device) -> tuple[Tensor, ...]:
    """Block tables that visit every (query block, KV block) pair as a partial block; head dim 1.

    (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices). Head dim 1 broadcasts over heads, which keeps
    the GPU flex-decoding kernel eligible. torch 2.13's CPU decoding kernel reads the full-block tables
    unconditionally, so they are explicit (and empty).
    """
    q_blocks, kv_blocks = -(-query_length // BLOCK_SIZE), -(-kv_length // BLOCK_SIZE)
    shape = (batch, 1, q_blocks)
    return (
        torch.full(shape, kv_blocks, dtype=torch.int32, device=device),
        torch.arange(kv_blocks, dtype=torch.int32, device=device).expand(*shape, kv_blocks).contiguous(),
        torch.zeros(shape, dtype=torch.int32, device=device),
        torch.zeros((*shape, kv_blocks), dtype=torch.int32, device=device),
    )


def slot_block_mask(tables: tuple[Tensor, ...], mask_mod: MaskMod, query_length: int, kv_length: int) -> BlockMask:
    """A BlockMask from ``tables`` whose ``mask_mod`` decides inside every block."""
    return BlockMask.from_kv_blocks(
        *tables,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(query_length, kv_length),
        compute_q_blocks=False,
    )
