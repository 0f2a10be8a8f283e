"""Which cached slot a query may attend: one rule, as a flex mask_mod and as a dense boolean tensor.

A query at absolute position ``qpos`` sees slot ``s`` of KV head ``h`` when the slot holds a token
(``valid``), that token is not in its future (``pos <= qpos``) and, for sliding-window layers, not too far in its
past (``qpos - pos < sliding_window``). Padding, per-head retention and causality all come from this one rule,
whatever order the slots are in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128


def slot_mask_mod(
    valid: Tensor, pos: Tensor, query_pos: Tensor, group: int, sliding_window: int | None = None
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention mask_mod over slot tensors ``valid``/``pos`` [B, Hkv, S] and ``query_pos`` [B, Lq].

    ``h`` is a query head; ``group`` query heads share one KV head. The tensors are read at call time, so mutating
    them in place changes the mask without rebuilding anything.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        kv_head = h // group
        key_pos = pos[b, kv_head, kv_idx]
        q = query_pos[b, q_idx]
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


def window_mask(n_used: Tensor | int, length: int, window: int, device: torch.device) -> Tensor:
    """Bool [length]: the ``window`` newest used slots, ``[n_used - window, n_used)``."""
    slot = torch.arange(length, device=device)
    return (slot >= n_used - window) & (slot < n_used)


def decode_block_tables(batch: int, capacity: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block tables for one query per sequence over ``capacity`` slots: every block visited as a partial block.

    (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), head dim 1: the GPU flex-decoding kernel stays
    eligible. torch 2.13's CPU decoding kernel reads the full-block tables unconditionally, so they are explicit
    (and empty).
    """
    num_blocks = -(-capacity // BLOCK_SIZE)
    shape = (batch, 1, 1)
    return (
        torch.full(shape, num_blocks, dtype=torch.int32, device=device),
        torch.arange(num_blocks, dtype=torch.int32, device=device).expand(*shape, num_blocks).contiguous(),
        torch.zeros(shape, dtype=torch.int32, device=device),
        torch.zeros((*shape, num_blocks), dtype=torch.int32, device=device),
    )


def decode_block_mask(
    tables: tuple[Tensor, Tensor, Tensor, Tensor],
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    group: int,
    sliding_window: int | None = None,
) -> BlockMask:
    """The BlockMask over the slots ``valid``/``pos`` [B, Hkv, C]: the tables say where to look, the mask_mod reads
    the slot tensors at run time, so one BlockMask stays right as the slots change in place."""
    return BlockMask.from_kv_blocks(
        *tables,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=slot_mask_mod(valid, pos, query_pos, group, sliding_window),
        seq_lengths=(1, valid.shape[2]),
        compute_q_blocks=False,
    )
