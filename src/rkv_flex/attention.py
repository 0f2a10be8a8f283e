"""The attention function transformers calls for a patched model.

Decoding (one query per sequence) runs compiled FlexAttention over the layer's slots with the layer's BlockMask, built
once per allocation, whose mask_mod reads the slot tensors: it stays valid as they change in place.
Multi-token forwards (prefill, chunks) and the ``attention="sdpa"`` reference run SDPA with the same rule as a
dense boolean mask. Either way the layer sees the queries first (padding, query window, staged compaction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from .cache import RKVLayer
from .masks import decode_block_mask, dense_slot_mask

ATTENTION_NAME = "rkv_flex"

# One compiled wrapper per process: dynamo caches on flex_attention's code object, and static shapes avoid a
# torch 2.13 CPU code-generation bug with dynamic shapes and captured tensors.
compiled_flex_attention = torch.compile(flex_attention, dynamic=False, fullgraph=True)


@torch.compiler.nested_compile_region
def flex_decode_region(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    tables: tuple[Tensor, Tensor, Tensor, Tensor],
    scale: float,
    sliding_window: int | None,
) -> Tensor:
    """Flex decoding over one layer's slots, as a region compiled once and reused by every layer of a traced step
    (30 layers otherwise render and build 30 copies of the same flex kernel: minutes of compile on a CPU)."""
    group = query.shape[1] // key.shape[1]
    block_mask = decode_block_mask(tables, valid, pos, query_pos, group, sliding_window)
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=group > 1)


def masked_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    valid: Tensor,
    pos: Tensor,
    query_pos: Tensor,
    scaling: float | None,
    sliding_window: int | None = None,
) -> Tensor:
    """Exact reference: SDPA with the slot rule as a dense mask. Returns [B, Hq, L, D].

    A query that may see nothing (padding in a chunk before its row's first token) attends to every slot instead,
    so its (unused) output stays finite and no NaN reaches the cache.
    """
    group = query.shape[1] // key.shape[1]
    allowed = dense_slot_mask(valid, pos, query_pos, sliding_window)
    allowed = (allowed | ~allowed.any(dim=-1, keepdim=True)).repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=group > 1)


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
    """transformers attention interface: returns ([B, L, Hq, D], None).

    ``attention_mask`` is what :func:`padding_mask` produced: the new tokens' padding [B, L] bool, or None.
    """
    layer: RKVLayer | None = kwargs.get("rkv_layer")
    sliding_window = kwargs.get("sliding_window")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer is None:
        out = cache_free_attention(
            query, key, value, attention_mask, kwargs.get("position_ids"), scaling, sliding_window
        )
        return out.transpose(1, 2).contiguous(), None
    query_pos = kwargs["position_ids"]
    valid, pos = layer.observe(query, query_pos, attention_mask, scaling)
    if query.shape[2] == 1 and layer.block_mask is not None:
        if torch.compiler.is_compiling():
            out = flex_decode_region(
                query, key, value, valid, pos, layer.query_pos, layer.block_tables, scaling, layer.sliding_window
            )
        else:
            group = query.shape[1] // key.shape[1]
            out = compiled_flex_attention(
                query, key, value, block_mask=layer.block_mask, scale=scaling, enable_gqa=group > 1
            )
    else:
        out = masked_sdpa(query, key, value, valid, pos, query_pos, scaling, layer.sliding_window)
    return out.transpose(1, 2).contiguous(), None


def cache_free_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    padding: Tensor | None,
    position_ids: Tensor | None,
    scaling: float,
    sliding_window: int | None,
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
    return masked_sdpa(query, key, value, valid, pos, position_ids, scaling, sliding_window)


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
