"""The scoring formulas of R-KV and its baselines, as pure tensor functions (docs/method.md states them).

Shapes: B sequences, Hq query heads, Hkv KV heads (query head ``h`` belongs to KV head ``h // (Hq // Hkv)``), S
slots, W observation queries, D head size. ``valid`` marks slots that hold a real token (not padding, not free);
``window`` [B, 1, S] the newest slots, always kept. Scores are fp32 and meaningless on invalid slots: the selection
masks them out. No function builds an S x S (or queries x S x group) temporary larger than ``block`` rows of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .masks import dense_slot_mask
from .rope import Rope, split_pairs

BLOCK = 256  # rows of a similarity or attention matrix computed at once


def capped(logits: Tensor, softcap: float | None) -> Tensor:
    """The model's logit soft-capping (Gemma 2), if any."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def window_attention(
    queries: Tensor, query_valid: Tensor, keys: Tensor, candidates: Tensor, scaling: float, softcap: float | None = None
) -> Tensor:
    """Mean attention [B, Hkv, S] the observation queries pay to each candidate slot (R-KV / SnapKV importance,
    before pooling).

    Logits ``scaling * q . k`` (soft-capped if the model does) are reduced over each KV head's query group by max
    (before the softmax), softmaxed over the candidate slots only, in fp32, and averaged over the valid observation
    queries.
    """
    group = queries.shape[1] // keys.shape[1]
    q = rearrange(queries.float(), "b (h g) w d -> b h (g w) d", g=group)
    logits = capped(torch.matmul(q, keys.float().transpose(-1, -2)) * scaling, softcap)
    logits = rearrange(logits, "b h (g w) s -> b h g w s", g=group).amax(dim=2)
    logits = logits.masked_fill(~candidates[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no candidate is all -inf
    weight = query_valid.float()[:, None, :, None]
    return (probs * weight).sum(dim=2) / weight.sum(dim=2).clamp(min=1.0)


def importance(
    queries: Tensor,
    query_valid: Tensor,
    keys: Tensor,
    candidates: Tensor,
    kernel: int,
    scaling: float,
    softcap: float | None = None,
) -> Tensor:
    """R-KV importance I [B, Hkv, S]: window attention max-pooled (width ``kernel``) along token order over the
    candidate slots, so a slot's neighbours are the nearest candidates before and after it whatever free or padding
    slots lie between (a staged span sits after the free slots); 0 on the other slots."""
    attention = window_attention(queries, query_valid, keys, candidates, scaling, softcap)
    batch, heads, slots = attention.shape
    order = (~candidates).to(torch.uint8).argsort(dim=-1, stable=True)  # candidates first, each group in slot order
    in_order = attention.gather(-1, order).reshape(batch * heads, 1, slots)
    pooled = F.max_pool1d(in_order, kernel, stride=1, padding=kernel // 2).reshape(batch, heads, slots)
    return torch.zeros_like(pooled).scatter(-1, order, pooled).masked_fill(~candidates, 0.0)


def redundancy(keys: Tensor, valid: Tensor, threshold: float, block: int = BLOCK) -> Tensor:
    """R-KV redundancy R [B, Hkv, S]: how much each key resembles the other valid keys.

    Cosine similarity of every pair of valid keys (diagonal zeroed); in each row the newest slot whose similarity
    exceeds ``threshold`` is exempted (zeroed), so the newest copy of a repeated key looks least redundant; the
    column mean over valid rows is softmaxed over valid slots. Rows are processed ``block`` at a time; the
    similarity matmul runs in the keys' dtype when it is 16-bit (as the reference does), sums in fp32.
    """
    slots = keys.shape[2]
    k = keys.float()
    unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    if keys.dtype in (torch.bfloat16, torch.float16):
        unit = unit.to(keys.dtype)
    slot = torch.arange(slots, device=keys.device, dtype=torch.int32)
    column_sum = torch.zeros(valid.shape, dtype=torch.float32, device=keys.device)
    for start in range(0, slots, block):
        rows = slice(start, min(start + block, slots))
        sim = torch.matmul(unit[:, :, rows], unit.transpose(-1, -2)).float()  # [B, Hkv, rows, S]
        pair_valid = valid[:, :, rows, None] & valid[:, :, None, :] & (slot[rows, None] != slot)
        sim = sim.masked_fill(~pair_valid, 0.0)
        newest_similar = torch.where((sim > threshold) & pair_valid, slot, -1).amax(dim=-1)
        sim = sim.masked_fill(slot == newest_similar[..., None], 0.0)
        column_sum += sim.sum(dim=-2)
    column_mean = column_sum / valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.softmax(column_mean.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)


def received_attention(
    query: Tensor,
    keys: Tensor,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    query_valid: Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
    block: int = BLOCK,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention each slot receives [B, Hkv, S] from the queries [B, Hq, L, D] (H2O's accumulation), summed over
    the valid queries and the query group, under the slot rule; ``block`` queries at a time. As the model computes
    it: soft-capped logits, and each query head's sink logit [Hq] in the softmax's denominator."""
    kv_heads = keys.shape[1]
    group, length = query.shape[1] // kv_heads, query.shape[2]
    received = torch.zeros(valid.shape, dtype=torch.float32, device=keys.device)
    for start in range(0, length, block):
        rows = slice(start, min(start + block, length))
        q = rearrange(query[:, :, rows].float(), "b (h g) l d -> b h (g l) d", g=group)
        logits = capped(torch.matmul(q, keys.float().transpose(-1, -2)) * scaling, softcap)
        logits = rearrange(logits, "b h (g l) s -> b h g l s", g=group)
        allowed = dense_slot_mask(valid, pos, query_pos[:, rows], sliding_window)
        logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
        if sinks is not None:  # one more column per query head, dropped after the softmax
            sink = rearrange(sinks.float(), "(h g) -> h g", g=group)[None, :, :, None, None]
            logits = torch.cat([logits, sink.expand(*logits.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)[..., : keys.shape[2]]
        if query_valid is not None:
            probs = probs * query_valid[:, None, None, rows, None]
        received += probs.sum(dim=(2, 3))
    return received


def frequency_scores(
    keys: Tensor,
    candidates: Tensor,
    center: Tensor,
    magnitude: Tensor,
    rope: Rope,
    now: Tensor,
    horizon: int,
) -> Tensor:
    """TriAttention's score [B, Hkv, S] of each post-RoPE key (docs/method.md 5.5).

    Per query head ``h`` with mean pre-RoPE query pairs ``c_f`` (``center`` [B or 1, Hq, D]) and mean pair
    magnitudes ``m_f`` (``magnitude`` [B or 1, Hq, F]), and a key whose pre-RoPE pairs are ``k_f`` at position
    ``p``: ``mean_o sum_f Re(c_f conj(k_f) exp(i omega_f (now - p + o))) + sum_f (m_f - |c_f|) |k_f|``, the logit
    the mean query pays the key from ``o`` positions past ``now`` [B] (``o`` = 1, 2, 4, ..., up to ``horizon``),
    plus the magnitude the mean leaves out. The cached key is ``a_f k_f exp(i omega_f p)``, so ``p`` cancels and no
    key is un-rotated: the mean over ``o`` folds into one phase per pair and row, and the trigonometric term becomes a
    dot product of the key with one query-side vector per head. z-normalised per head over ``candidates``, then the
    max over each KV head's query group.
    """
    kv_heads = keys.shape[1]
    group = center.shape[1] // kv_heads
    key_real, key_imag = split_pairs(keys.float(), rope.rotary)  # [B, Hkv, S, F]
    center_real, center_imag = split_pairs(center.float(), rope.rotary)  # [B, Hq, F]
    omega, amplitude = rope.omega.to(keys.device), rope.amplitude.to(keys.device)
    # the future distances 1, 2, 4, ..., <= horizon, made by ops (a tensor literal inside a compiled region that
    # layers share fails at run time in torch 2.13's inductor)
    offsets = torch.exp2(torch.arange(horizon.bit_length(), device=keys.device, dtype=torch.float32))
    spread = omega[:, None] * offsets  # [F, O]
    mean_real, mean_imag = torch.cos(spread).mean(-1), torch.sin(spread).mean(-1)
    turn = now.float()[:, None] * omega  # [B, F]
    phase_real = torch.cos(turn) * mean_real - torch.sin(turn) * mean_imag
    phase_imag = torch.sin(turn) * mean_real + torch.cos(turn) * mean_imag
    phase_real, phase_imag = phase_real[:, None] / amplitude, phase_imag[:, None] / amplitude  # [B, 1, F]
    along_real = center_real * phase_real - center_imag * phase_imag
    along_imag = center_imag * phase_real + center_real * phase_imag
    missing = (magnitude.float() - torch.hypot(center_real, center_imag)) / amplitude  # [B, Hq, F]

    def per_group(tensor: Tensor) -> Tensor:  # [B or 1, Hq, F] -> [B, Hkv, g, F]
        return rearrange(tensor, "b (h g) f -> b h g f", g=group).expand(keys.shape[0], -1, -1, -1)

    scores = torch.einsum("bhsf,bhgf->bhgs", key_real, per_group(along_real))
    scores = scores + torch.einsum("bhsf,bhgf->bhgs", key_imag, per_group(along_imag))
    scores = scores + torch.einsum("bhsf,bhgf->bhgs", torch.hypot(key_real, key_imag), per_group(missing))
    weight = candidates[:, :, None, :].float()
    count = weight.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (scores * weight).sum(-1, keepdim=True) / count
    spread_of_scores = (((scores - mean) ** 2 * weight).sum(-1, keepdim=True) / count).sqrt().clamp(min=1e-6)
    return ((scores - mean) / spread_of_scores).amax(dim=2)


def select_keep(scores: Tensor, valid: Tensor, window: Tensor, keep: int) -> Tensor:
    """Slot indices [B, Hkv, keep]: every ``window`` slot plus the best-scored other valid slots, ascending, with
    any invalid filler (fewer valid slots than ``keep``) moved first, so the newest kept slots stay the newest
    tokens."""
    ranked = scores.float().masked_fill(~valid, float("-inf")).masked_fill(window, float("inf"))
    kept = ranked.topk(keep, dim=-1, sorted=False).indices
    order = kept + valid.gather(-1, kept) * valid.shape[-1]  # invalid ones first, each group in slot order
    return kept.gather(-1, order.argsort(dim=-1))


def select_adaptive(scores: Tensor, valid: Tensor, window: Tensor, total: int, floor: int, ceiling: int) -> Tensor:
    """Head-adaptive selection (AdaKV's allocation): a mask [B, Hkv, S] of the slots one layer keeps, ``total``
    over its KV heads per row.

    Each head keeps its ``window`` slots and, with them, its ``floor`` best-scored valid slots; no head keeps more
    than ``ceiling``; the rest of ``total`` goes to the best scores across the layer's heads. The scores of the
    built-in policies are comparable across heads as they are: each is a share of a unit mass of its head
    (importance a distribution over the head's candidates, redundancy a softmax over its slots, H2O sums of
    attention distributions). Fewer valid slots than ``total`` are all kept.
    """
    batch, heads, slots = scores.shape
    ranked = scores.float().masked_fill(~valid, float("-inf")).masked_fill(window & valid, float("inf"))
    ordered, order = ranked.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(slots, device=scores.device)
    real = ordered > float("-inf")
    priority = torch.where((rank < floor) & real, float("inf"), ordered)
    priority = priority.masked_fill(rank >= ceiling, float("-inf"))
    flat = priority.flatten(1)
    best = flat.topk(min(total, flat.shape[1]), dim=-1, sorted=False)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, best.indices, best.values > float("-inf"))
    return torch.zeros_like(valid).scatter_(-1, order, chosen.view(batch, heads, slots))
