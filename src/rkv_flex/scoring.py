"""The scoring formulas of R-KV and its baselines, as pure tensor functions.

Shapes: B sequences, Hq query heads, Hkv KV heads (query head ``h`` belongs to KV head ``h // (Hq // Hkv)``), S
slots, W observation queries, D head size. Slots hold tokens in position order; ``valid`` marks slots that hold
a real token (not padding, not free). Every score is computed in fp32 and is meaningless on invalid slots: the
selection masks them out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def window_attention(queries: Tensor, query_valid: Tensor, keys: Tensor, candidates: Tensor) -> Tensor:
    """Mean attention [B, Hkv, S] the observation queries pay to each candidate slot (R-KV / SnapKV importance,
    before pooling).

    Logits ``q . k / sqrt(D)`` are reduced over each KV head's query group by max (before the softmax), softmaxed
    over the candidate slots only, in fp32, and averaged over the valid observation queries.
    """
    group = queries.shape[1] // keys.shape[1]
    q = rearrange(queries.float(), "b (h g) w d -> b h (g w) d", g=group)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) / math.sqrt(keys.shape[-1])
    logits = rearrange(logits, "b h (g w) s -> b h g w s", g=group).amax(dim=2)
    logits = logits.masked_fill(~candidates[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no candidate is all -inf
    weight = query_valid.float()[:, None, :, None]
    return (probs * weight).sum(dim=2) / weight.sum(dim=2).clamp(min=1.0)


def importance(queries: Tensor, query_valid: Tensor, keys: Tensor, candidates: Tensor, kernel: int) -> Tensor:
    """R-KV importance I [B, Hkv, S]: window attention max-pooled (width ``kernel``) along slot order."""
    attention = window_attention(queries, query_valid, keys, candidates)
    batch, heads, slots = attention.shape
    pooled = F.max_pool1d(attention.reshape(batch * heads, 1, slots), kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(batch, heads, slots)


def redundancy(keys: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """R-KV redundancy R [B, Hkv, S]: how much each key resembles the other valid keys.

    Cosine similarity of every pair of valid keys (diagonal zeroed); in each row the newest slot whose similarity
    exceeds ``threshold`` is exempted (zeroed), so the newest copy of a repeated key looks least redundant; the
    column mean over valid rows is softmaxed over valid slots.
    """
    k = keys.float()
    unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = torch.matmul(unit, unit.transpose(-1, -2))
    slots = keys.shape[2]
    not_self = ~torch.eye(slots, dtype=torch.bool, device=keys.device)
    pair_valid = valid[..., :, None] & valid[..., None, :] & not_self
    sim = sim.masked_fill(~pair_valid, 0.0)
    slot = torch.arange(slots, device=keys.device)
    newest_similar = torch.where((sim > threshold) & pair_valid, slot, -1).amax(dim=-1)
    sim = sim.masked_fill(slot == newest_similar[..., None], 0.0)
    column_mean = sim.sum(dim=-2) / valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.softmax(column_mean.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)


def select_keep(scores: Tensor, valid: Tensor, window: Tensor, keep: int) -> Tensor:
    """Slot indices [B, Hkv, keep], ascending: every ``window`` slot plus the best-scored other valid slots."""
    ranked = scores.float().masked_fill(~valid, float("-inf")).masked_fill(window, float("inf"))
    return ranked.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
