"""Which cached slot a query may attend, and how a model changes attention scores, as flex mask and score mods.

A query at absolute position ``qpos`` sees slot ``s`` of KV head ``h`` when the slot holds a token (``valid``),
that token is not in its future (``pos <= qpos``) and, on sliding-window layers, not too far in its past
(``qpos - pos < sliding_window``). Padding, per-head retention and causality all come from this one rule, whatever
order the slots are in. Queries that are only padding of a bucket carry position -1 and see nothing.

The position part of the rule is attn-gym's causal and sliding-window mask_mods, remapped from slot indices to the
absolute positions the slots hold (as gpt-fast offsets a mask_mod); ``dense_slot_mask`` restates the rule directly,
as the independent reference. Score changes a model makes (logit soft-capping, learned attention sinks) are
score_mods; a sink lives in one slot that never holds a token, whose score becomes the sink's logit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attn_gym.masks import causal_mask, generate_sliding_window
from attn_gym.mods import generate_tanh_softcap
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def at_positions(position_mod: MaskMod, pos: Tensor, query_pos: Tensor, group: int, rows_per_query: int) -> MaskMod:
    """A mask_mod over absolute positions (attn-gym's) as one over slots: query row -> its token's position,
    slot -> the position of the token it holds."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return position_mod(b, h, query_pos[b, q_idx // rows_per_query], pos[b, h // group, kv_idx])

    return mask_mod


def slot_mask_mod(
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    group: int,
    sliding_window: int | None = None,
    rows_per_query: int = 1,
    sink_slot: int | None = None,
) -> MaskMod:
    """FlexAttention mask_mod over slot tensors ``valid``/``pos`` [B, Hkv, S] and ``query_pos`` [B, Lq].

    ``h`` is a query head; ``group`` query heads share one KV head. With the query group folded into the query
    length (``group=1``, ``h`` a KV head, and ``rows_per_query`` = G query rows per token), query row ``q_idx``
    belongs to token ``q_idx // rows_per_query``. ``sink_slot``: the slot every query sees (an attention sink). The
    tensors are read at call time, so mutating them in place changes the mask without rebuilding anything.
    """
    # attn-gym's window counts the tokens before the query; transformers' (and this rule's) counts the query too
    by_position = causal_mask if sliding_window is None else generate_sliding_window(sliding_window - 1)
    position_rule = at_positions(by_position, pos, query_pos, group, rows_per_query)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = valid[b, h // group, kv_idx] & position_rule(b, h, q_idx, kv_idx)
        if sink_slot is not None:
            allowed = allowed | (kv_idx == sink_slot)
        return allowed

    return mask_mod


def slot_score_mod(
    softcap: float | None, sinks: Tensor | None, sink_slot: int | None, rows_per_query: int = 1
) -> ScoreMod | None:
    """The model's score changes as a score_mod (None: none): ``softcap * tanh(score / softcap)`` (attn-gym's),
    then the sink slot's score replaced by the query head's sink logit ``sinks`` [Hq]. With the query group folded
    into the query length (``rows_per_query`` = G), query row ``q_idx`` of KV head ``h`` is query head
    ``h * G + q_idx % G``."""
    if softcap is None and sinks is None:
        return None
    capped = generate_tanh_softcap(softcap) if softcap is not None else None

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if capped is not None:
            score = capped(score, b, h, q_idx, kv_idx)
        if sinks is not None:
            head = h if rows_per_query == 1 else h * rows_per_query + q_idx % rows_per_query
            score = torch.where(kv_idx == sink_slot, sinks[head].to(score.dtype), score)
        return score

    return score_mod


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


def pooled_mask_mod(
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    start: Tensor,
    kept: Tensor,
    room: int,
    group: int,
    sliding_window: int | None = None,
    sink_slot: int | None = None,
) -> MaskMod:
    """The slot rule over a pool shared by all KV heads (``valid``/``pos`` [B, 1, P]): query head ``h`` sees only
    the slots its KV head ``h // group`` owns, ``[start, start + kept + room)`` ([B, Hkv] each; the end is computed
    here, since torch 2.13's CPU kernel cannot read a buffer computed in the same graph), and the sink slot if any."""
    within_pool = slot_mask_mod(valid, pos, query_pos, group=start.shape[1] * group, sliding_window=sliding_window)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        head = h // group
        owned = (kv_idx >= start[b, head]) & (kv_idx < start[b, head] + kept[b, head] + room)
        allowed = within_pool(b, h, q_idx, kv_idx) & owned
        if sink_slot is not None:
            allowed = allowed | (kv_idx == sink_slot)
        return allowed

    return mask_mod


def segment_block_tables(
    start: Tensor, end: Tensor, group: int, kv_length: int, sink_slot: int | None = None
) -> tuple[Tensor, ...]:
    """Block tables [B, Hq, 1, ...] for one query per row over a pool: each query head visits only the blocks of its
    KV head's segment ``[start, end)`` [B, Hkv] (and the sink slot's block), so its cost follows its own slots."""
    kv_blocks = -(-kv_length // BLOCK_SIZE)
    first = (start // BLOCK_SIZE).repeat_interleave(group, dim=1)
    last = ((end - 1) // BLOCK_SIZE).repeat_interleave(group, dim=1)
    count = last - first + 1
    step = torch.arange(kv_blocks, device=start.device)
    indices = (first[..., None] + step).clamp(max=kv_blocks - 1)
    if sink_slot is not None:  # one more block: the sink's, unless the segment reaches it
        sink_block = sink_slot // BLOCK_SIZE
        indices = torch.where(step == count[..., None], sink_block, indices)
        count = count + (last < sink_block).long()
    shape = (*start.shape[:1], first.shape[1], 1)
    return (
        count.to(torch.int32).view(shape),
        indices.to(torch.int32).view(*shape, kv_blocks),
        torch.zeros(shape, dtype=torch.int32, device=start.device),
        torch.zeros((*shape, kv_blocks), dtype=torch.int32, device=start.device),
    )
