"""The attention function transformers calls for a patched model, over the layer's slots.

Every path applies one rule (``masks.py``): a query sees the valid slots at or before its position.

* Multi-token forwards (prefill, prompt chunks, teacher-forced replay) run compiled FlexAttention over the used
  slots followed by the new tokens (staged by the layer), with a BlockMask built from the slot mask_mod; query and
  key lengths are padded to a few buckets so a handful of kernels serve every chunk length.
* A compiled decoding step (rkv_flex's loop, or transformers' compiled generate) runs flex decoding over the slots
  inside the traced graph, one region shared by all layers.
* An eager decoding step runs fused SDPA over the slots with the query group folded into the query length: the
  mask is just the slots' validity, one op with no compiled-call overhead.
* ``attention="sdpa"`` runs dense-mask SDPA everywhere: the exact reference the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from .cache import RKVLayer
from .compiled import compiled
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

ATTENTION_NAME = "rkv_flex"

# Keyword arguments transformers passes that do not change attention's result here.
INERT_KWARGS = frozenset(
    {"position_ids", "use_cache", "rkv_layer", "output_attentions", "cache_position", "output_router_logits"}
)
# Implemented: ``sliding_window`` (it must agree with the window the cache derived for the layer), ``softcap``
# (logit soft-capping, Gemma 2) and ``s_aux`` (learned attention sinks, gpt-oss).
HANDLED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux"})


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
    """Flex attention of many queries [B, Hq, L, D] over staged slots [B, Hkv, S, D]."""
    batch, query_heads, length, _ = query.shape
    group, slots = query_heads // key.shape[1], key.shape[2]
    mask_mod = slot_mask_mod(valid, pos, query_pos, group, sliding_window, sink_slot=sink_slot)
    block_mask = slot_block_mask(block_tables(batch, length, slots, query.device), mask_mod, length, slots)
    score_mod = slot_score_mod(softcap, sinks, sink_slot)
    return flex_attention(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=group > 1
    )


compiled_flex_span = compiled(flex_span)


@torch.compiler.nested_compile_region
def flex_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    scale: float,
    sliding_window: int | None,
    fold_group: bool,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    sink_slot: int | None = None,
) -> Tensor:
    """Flex decoding of one query per row [B, Hq, 1, D] over the slots, inside a traced step (a region compiled once
    and reused by every layer). ``fold_group`` reads each KV head once for its whole query group: the group becomes
    the query length ([B, Hkv, G, D]), which keeps flex's decoding kernel for any group size."""
    batch, query_heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = query_heads // kv_heads
    if fold_group:
        query = query.view(batch, kv_heads, group, dim)
        mask_mod = slot_mask_mod(valid, pos, query_pos, 1, sliding_window, rows_per_query=group, sink_slot=sink_slot)
        block_mask = slot_block_mask(block_tables(batch, group, slots, query.device), mask_mod, group, slots)
        score_mod = slot_score_mod(softcap, sinks, sink_slot, rows_per_query=group)
        out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)
        return out.view(batch, query_heads, 1, -1)
    mask_mod = slot_mask_mod(valid, pos, query_pos, group, sliding_window, sink_slot=sink_slot)
    block_mask = slot_block_mask(block_tables(batch, 1, slots, query.device), mask_mod, 1, slots)
    score_mod = slot_score_mod(softcap, sinks, sink_slot)
    return flex_attention(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=group > 1
    )


@torch.compiler.nested_compile_region
def flex_pool_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    valid: Tensor,
    pos: Tensor,
    start: Tensor,
    kept: Tensor,
    room: int,
    query_pos: Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    sink_slot: int | None = None,
) -> Tensor:
    """:func:`flex_step` over a pooled layer (pool.py): keys [B, 1, P, D] shared by every query head, each head
    masked to its KV head's segment ``[start, start + kept + room)`` ([B, Hkv] each) and visiting only that
    segment's blocks."""
    group, slots = query.shape[1] // start.shape[1], key.shape[2]
    mask_mod = pooled_mask_mod(valid, pos, query_pos, start, kept, room, group, sliding_window, sink_slot)
    tables = segment_block_tables(start, start + kept + room, group, slots, sink_slot)
    block_mask = slot_block_mask(tables, mask_mod, 1, slots)
    score_mod = slot_score_mod(softcap, sinks, sink_slot)
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)


def pool_sdpa_step(
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
) -> Tensor:
    """:func:`sdpa_step` over a pooled layer: keys [B, 1, P, D], ``allowed`` [B, Hkv, P] the valid slots each KV
    head owns."""
    batch, query_heads, _, dim = query.shape
    kv_heads = allowed.shape[1]
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, None, :] - pos < sliding_window)
    if softcap is not None or sinks is not None:
        allowed = allowed[:, :, None, :].repeat_interleave(query_heads // kv_heads, dim=1)
        return dense_attention(query, key, value, allowed, scale, softcap, sinks)
    folded = query.view(batch, kv_heads, query_heads // kv_heads, dim)
    mask = allowed[:, :, None, :]
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.view(batch, query_heads, 1, -1)


def sdpa_step(
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
    prefix: int | None = None,
) -> Tensor:
    """One query per row over the slots with fused SDPA, the query group folded into the query length. Every valid
    slot of a decoding step holds an earlier token, so validity (and the sliding window) is the whole rule; when the
    host knows the first ``prefix`` slots are exactly the valid ones (no padding ever), no mask is needed at all.
    With soft-capping or sinks (which SDPA cannot express) the attention is written out."""
    batch, query_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.view(batch, kv_heads, query_heads // kv_heads, dim)
    if prefix is not None and sliding_window is None and softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(folded, key[:, :, :prefix], value[:, :, :prefix], scale=scale)
        return out.view(batch, query_heads, 1, -1)
    allowed = valid[:, :, None, :]
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, None, :, None] - pos[:, :, None, :] < sliding_window)
    if softcap is not None or sinks is not None:
        allowed = allowed.repeat_interleave(query_heads // kv_heads, dim=1)
        return dense_attention(query, key, value, allowed, scale, softcap, sinks)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=allowed, scale=scale)
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


def refuse_unknown(module: torch.nn.Module, kwargs: dict) -> None:
    unknown = sorted(name for name in kwargs if name not in INERT_KWARGS and name not in HANDLED_KWARGS)
    if unknown:
        model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise NotImplementedError(
            f"rkv_flex attention does not implement the argument(s) {unknown} that {model_type} passes to its "
            "attention; they change the result, so it refuses rather than ignore them"
        )


def rkv_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention interface: returns ([B, L, Hq, Dv], None).

    ``attention_mask`` is what :func:`padding_mask` produced: the new tokens' padding [B, L] bool, or None.
    """
    refuse_unknown(module, kwargs)
    if dropout:
        raise NotImplementedError("rkv_flex attention is for inference: attention dropout must be 0 (model.eval())")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer: RKVLayer | None = kwargs.get("rkv_layer")
    if layer is None:
        out = cache_free_attention(query, key, value, attention_mask, kwargs.get("position_ids"), scale, kwargs)
        return out.transpose(1, 2).contiguous(), None
    window = layer.sliding_window
    if "sliding_window" in kwargs and kwargs["sliding_window"] != window and not torch.compiler.is_compiling():
        raise ValueError(
            f"layer {layer.index} attends a sliding window of {kwargs['sliding_window']}, but the cache derived "
            f"{window} from the model config"
        )
    positions = kwargs["position_ids"]
    reference = layer.config.attention == "sdpa"
    changes = dict(softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    layer.learn_score_changes(**changes)
    sink_slot = layer.sink_slot
    if layer.incoming is None and layer.pooled:
        layer.observe_step(query, positions, scale)
        out = pooled_step(layer, query, key, value, positions, scale, reference, changes)
        return out.transpose(1, 2).contiguous(), None
    if layer.incoming is None:  # one new token per row, already in the slots
        layer.observe_step(query, positions, scale)
        slots = layer.view
        if reference:
            out = masked_sdpa(query, key, value, slots.valid, slots.pos, positions, scale, window, **changes)
        elif torch.compiler.is_compiling():
            out = flex_step(
                query,
                key,
                value,
                slots.valid,
                slots.pos,
                positions,
                scale,
                window,
                layer.fold_group,
                **changes,
                sink_slot=sink_slot,
            )
        else:
            prefix = layer.dense_prefix()
            out = sdpa_step(
                query, key, value, slots.valid, slots.pos, positions, scale, window, **changes, prefix=prefix
            )
        return out.transpose(1, 2).contiguous(), None
    length = query.shape[2]
    padded = span_length(length)
    staged = layer.stage(query, attention_mask, scale, padded)
    if reference:
        out = masked_sdpa(
            query, staged.keys, staged.values, staged.valid, staged.pos, positions, scale, window, **changes
        )
    else:
        extra = padded - length
        staged_query = torch.cat([query, query.new_zeros(*query.shape[:2], extra, query.shape[-1])], dim=2)
        query_pos = torch.cat([positions, positions.new_full((positions.shape[0], extra), -1)], dim=1)
        out = compiled_flex_span(
            staged_query,
            staged.keys,
            staged.values,
            staged.valid,
            staged.pos,
            query_pos,
            scale,
            window,
            **changes,
            sink_slot=layer.staged_sink_slot,
        )[:, :, :length]
    layer.commit(staged)
    return out.transpose(1, 2).contiguous(), None


def pooled_step(
    layer: RKVLayer,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    positions: Tensor,
    scale: float,
    reference: bool,
    changes: dict,
) -> Tensor:
    """One new token per row over a pooled layer: flex (compiled), SDPA (eager), or the dense reference over each
    head's view of the pool."""
    pool, window = layer.view, layer.sliding_window
    if reference:
        view = pool.heads(layer.counters.used)
        return masked_sdpa(query, view.keys, view.values, view.valid, view.pos, positions, scale, window, **changes)
    if torch.compiler.is_compiling():
        return flex_pool_step(
            query,
            key,
            value,
            pool.valid,
            pool.pos,
            pool.start,
            pool.kept,
            pool.buffer,
            positions,
            scale,
            window,
            **changes,
            sink_slot=layer.sink_slot,
        )
    allowed = pool.valid & pool.owned()
    return pool_sdpa_step(query, key, value, allowed, pool.pos, positions, scale, window, **changes)


def cache_free_attention(
    query: Tensor, key: Tensor, value: Tensor, padding: Tensor | None, position_ids: Tensor | None, scale: float, kwargs
) -> Tensor:
    """A patched model run without an RKVCache: exact causal attention over this forward's own tokens."""
    batch, kv_heads, length = key.shape[:3]
    if length != query.shape[2]:
        raise RuntimeError(
            "this model is patched by rkv_flex and can only continue from an RKVCache; it was given another cache. "
            "Let generate() create the cache, pass rkv_flex.make_cache(model), or call unpatch_model(model) first."
        )
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device)[None]
    position_ids = position_ids.expand(batch, length)
    valid = torch.ones(batch, kv_heads, length, dtype=torch.bool, device=query.device)
    if padding is not None:
        valid &= padding[:, None, :]
    pos = position_ids[:, None, :].expand(batch, kv_heads, length)
    changes = dict(softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    return masked_sdpa(query, key, value, valid, pos, position_ids, scale, kwargs.get("sliding_window"), **changes)


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """transformers mask interface: hand attention only the new tokens' padding [B, L] (None when decoding).

    The slot rule replaces the causal mask, so nothing else is needed; returning None for single-token steps keeps
    the decode inputs static.
    """
    if attention_mask is None or q_length == 1:
        return None
    return attention_mask[:, -q_length:].to(torch.bool)
