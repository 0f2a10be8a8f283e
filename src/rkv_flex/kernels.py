"""The attention kernels, as pure functions of the slot tensors (no cache, no model).

* :func:`flex_span`: compiled FlexAttention of a multi-token forward (prompt chunks, teacher-forced replay) over
  staged slots, with a BlockMask from the slot mask_mod.
* :func:`flex_decode`: FlexAttention of one query per row over the slots of a uniform or a pooled layer, for
  compiled decoding steps (``flex_step`` is the same function as a region compiled once and shared by every layer
  of a traced step).
* :func:`sdpa_step`: fused SDPA of one query per row over the slots each KV head may read (uniform or pooled), with
  an optional unmasked prefix: eager decoding, and compiled decoding where flex is not trusted.
* :func:`masked_sdpa`: the exact reference, SDPA with the slot rule as a dense mask (written out as
  :func:`dense_attention` when the model soft-caps logits or has sinks).

Every kernel applies the one rule of ``masks.py``: a query sees the valid slots at or before its position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from .masks import (
    BLOCK_SIZE,
    block_tables,
    dense_slot_mask,
    pooled_mask_mod,
    segment_block_tables,
    slot_block_mask,
    slot_mask_mod,
    slot_score_mod,
)


def span_length(length: int) -> int:
    """The padded length a multi-token forward of ``length`` tokens is computed at: powers of two from one block."""
    return max(BLOCK_SIZE, 1 << (length - 1).bit_length())


def flex_span(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    sink_slot: int | None = None,
) -> Tensor:
    """Flex attention of queries [B, Hq, L, D] over slots [B, Hkv, S, D] (staged slots of a multi-token forward, or
    a layer's slots for one query per row)."""
    batch, query_heads, length, _ = query.shape
    group, slots = query_heads // key.shape[1], key.shape[2]
    mask_mod = slot_mask_mod(valid, pos, query_pos, group, sliding_window, sink_slot=sink_slot)
    block_mask = slot_block_mask(block_tables(batch, length, slots, query.device), mask_mod, length, slots)
    score_mod = slot_score_mod(softcap, sinks, sink_slot)
    return flex_attention(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=group > 1
    )


# A pooled layer's (start, kept, room): KV head h owns the pool slots [start, start + kept + room).
Segments = tuple[Tensor, Tensor, int]


def flex_decode(
    query: Tensor,
    key: Tensor,
    value: Tensor | None,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    sink_slot: int | None = None,
    segments: Segments | None = None,
    value_channels: int | None = None,
) -> Tensor:
    """Flex decoding of one query per row [B, Hq, 1, D] over a layer's slots: [B, Hkv, S, D] (uniform), or a pool
    [B, 1, P, D] shared by the KV heads with ``segments`` (head-adaptive budgets, pool.py), where each query head
    sees, and visits the blocks of, only its KV head's segment. ``value`` None: the values are the keys' first
    ``value_channels`` (an MLA latent; a region shared by layers takes no aliasing inputs, so the view is made here)."""
    if value is None:
        value = key[..., :value_channels]
    if segments is None:
        return flex_span(query, key, value, valid, pos, query_pos, scale, sliding_window, softcap, sinks, sink_slot)
    start, kept, room = segments
    group, slots = query.shape[1] // start.shape[1], key.shape[2]
    mask_mod = pooled_mask_mod(valid, pos, query_pos, start, kept, room, group, sliding_window, sink_slot)
    tables = segment_block_tables(start, start + kept + room, group, slots, sink_slot)
    block_mask = slot_block_mask(tables, mask_mod, 1, slots)
    score_mod = slot_score_mod(softcap, sinks, sink_slot)
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)


# Inside a traced decoding step: one region compiled once and reused by every layer.
flex_step = torch.compiler.nested_compile_region(flex_decode)


def sdpa_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    prefix: int | None = None,
) -> Tensor:
    """One query per row with fused SDPA over the slots each KV head may read, ``allowed`` [B, Hkv, S], the query
    group folded into the query length; keys [B, Hkv, S, D], or [B, 1, S, D] shared by every head (a pool). Every
    valid slot of a decoding step holds an earlier token, so ``allowed`` (and the sliding window, from ``pos``
    [B, Hkv or 1, S]) is the whole rule; when the host knows the first ``prefix`` slots are exactly the allowed ones
    (no padding ever, uniform slots), no mask is needed at all. With soft-capping or sinks (which SDPA cannot
    express) the attention is written out."""
    batch, query_heads, _, dim = query.shape
    kv_heads = allowed.shape[1]
    folded = query.view(batch, kv_heads, query_heads // kv_heads, dim)
    if prefix is not None and sliding_window is None and softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(folded, key[:, :, :prefix], value[:, :, :prefix], scale=scale)
        return out.view(batch, query_heads, 1, -1)
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, None, :] - pos < sliding_window)
    if softcap is not None or sinks is not None:
        allowed = allowed[:, :, None, :].repeat_interleave(query_heads // kv_heads, dim=1)
        keys = key.expand(-1, kv_heads, -1, -1)
        return dense_attention(query, keys, value.expand(-1, kv_heads, -1, -1), allowed, scale, softcap, sinks)
    shared = key.shape[1] != kv_heads
    out = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=allowed[:, :, None, :], scale=scale, enable_gqa=shared
    )
    return out.view(batch, query_heads, 1, -1)


def masked_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Exact reference: SDPA with the slot rule as a dense mask [B, Hq, L, S] (the attention written out when the
    model soft-caps or has sinks). Returns [B, Hq, L, Dv].

    A query that may see nothing (padding before its row's first token) attends to every slot instead, so its
    (unused) output stays finite.
    """
    group = query.shape[1] // key.shape[1]
    allowed = dense_slot_mask(valid, pos, query_pos, sliding_window)
    allowed = (allowed | ~allowed.any(dim=-1, keepdim=True)).repeat_interleave(group, dim=1)
    if softcap is not None or sinks is not None:
        return dense_attention(query, key, value, allowed, scale, softcap, sinks)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=group > 1)


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor,
    scale: float,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention written out, as transformers' eager path computes it: scaled logits, soft-capped, masked by
    ``allowed`` [B, Hq, L, S], softmaxed (in fp32) with each query head's sink logit as one more zero-valued
    column. Returns [B, Hq, L, Dv]."""
    group = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs.to(value.dtype), values)
