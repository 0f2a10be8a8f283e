"""The attention function transformers calls for a patched model, over the layer's slots.

Which kernel (``kernels.py``) serves a forward:

| forward                                   | attention="flex"                          | attention="sdpa" |
|-------------------------------------------|-------------------------------------------|------------------|
| several tokens, into empty slots          | masked_sdpa over the new tokens alone     | masked_sdpa      |
| several tokens, after earlier ones        | compiled flex_span (SDPA if not trusted)  | masked_sdpa      |
| one token per row, traced (compiled step) | flex_step (sdpa_step if not trusted)      | masked_sdpa      |
| one token per row, eager                  | sdpa_step                                 | masked_sdpa      |

"Trusted": the compiled flex kernel agreed with the dense reference for this shape on this machine
(``kernel_checks.py``). Each kernel serves both slot layouts (uniform, and pooled for head-adaptive budgets): the
layout hands it the slots each head may read. Every kernel applies the same slot rule, so the choice changes speed,
not results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import RKVLayer, StagedSpan
from .kernels import flex_step, masked_sdpa, sdpa_step, span_length
from .latent import absorb_query, expand_output, is_latent

ATTENTION_NAME = "rkv_flex"

# Keyword arguments transformers passes that do not change attention's result here.
INERT_KWARGS = frozenset(
    {
        "position_ids",
        "use_cache",
        "rkv_layer",
        "rkv_source",
        "output_attentions",
        "cache_position",
        "output_router_logits",
    }
)
# Implemented: ``sliding_window`` (it must agree with the window the cache derived for the layer), ``softcap``
# (logit soft-capping, Gemma 2) and ``s_aux`` (learned attention sinks, gpt-oss).
HANDLED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux"})


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

    ``attention_mask`` is what :func:`padding_mask` produced: the new tokens' padding [B, 1, 1, L] bool, or None.
    A KV-sharing layer (Gemma 3n/4) gets ``rkv_source``, the layer whose keys it reads, instead of ``rkv_layer``.
    """
    refuse_unknown(module, kwargs)
    if dropout:
        raise NotImplementedError("rkv_flex attention is for inference: attention dropout must be 0 (model.eval())")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    latent = is_latent(module)  # MLA: latent queries over latent slots, the output up-projected after (latent.py)
    if latent:
        query = absorb_query(module, query)
    out = attend(module, query, key, value, attention_mask, scale, kwargs)
    if latent:
        out = expand_output(module, out)
    return out.transpose(1, 2).contiguous(), None


def attend(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float, kwargs: dict
) -> Tensor:
    """[B, Hq, L, Dv]: the queries over the cache layer's slots (or, without a cache, over this forward's tokens)."""
    padding = None if mask is None else mask.flatten(1)
    layer: RKVLayer | None = kwargs.get("rkv_layer")
    source: RKVLayer | None = kwargs.get("rkv_source")
    if layer is None and source is None:
        shares_kv = getattr(module, "is_kv_shared_layer", False)
        return cache_free_attention(query, key, value, padding, kwargs.get("position_ids"), scale, kwargs, shares_kv)
    reader = layer is None
    layer = source if reader else layer
    window = layer.sliding_window
    if "sliding_window" in kwargs and kwargs["sliding_window"] != window and not torch.compiler.is_compiling():
        raise ValueError(
            f"layer {layer.index} attends a sliding window of {kwargs['sliding_window']}, but the cache derived "
            f"{window} from the model config"
        )
    positions = kwargs["position_ids"]
    changes = dict(softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    if reader:  # its queries attend the source's kept set; they neither score nor are recorded
        batch, length = query.shape[0], query.shape[2]
        positions = positions[:, -length:].expand(batch, length)  # Gemma 4 may read only the last queries
        if layer.last_span is None:
            return decode_attention(layer, query, key, value, positions, scale, changes)
        return attend_staged(layer, layer.last_span, query, positions, scale, changes)
    layer.learn_score_changes(**changes)
    if layer.incoming is None:  # one new token per row, already in the slots
        layer.observe_step(query, positions, scale)
        return decode_attention(layer, query, key, value, positions, scale, changes)
    return span_attention(layer, query, padding, positions, scale, changes)


def decode_attention(
    layer: RKVLayer, query: Tensor, key: Tensor, value: Tensor, positions: Tensor, scale: float, changes: dict
) -> Tensor:
    """One new token per row over the layer's slots (``key``/``value``: the slots, in their layout)."""
    slots, window = layer.view, layer.sliding_window
    if layer.config.attention == "sdpa":
        view = slots.heads(layer.counters.used)
        return masked_sdpa(query, view.keys, view.values, view.valid, view.pos, positions, scale, window, **changes)
    if torch.compiler.is_compiling() and layer.flex_decoding:  # eager flex is slow: SDPA is as fast eagerly
        rule = (slots.valid, slots.pos, positions, scale, window)
        value, latent = (None, layer.spec.latent) if layer.spec.latent is not None else (value, None)
        return flex_step(
            query,
            key,
            value,
            *rule,
            **changes,
            sink_slot=layer.sink_slot,
            segments=slots.segments,
            value_channels=latent,
        )
    prefix = None if torch.compiler.is_compiling() else layer.dense_prefix()  # what the host knows
    return sdpa_step(query, key, value, slots.allowed(), slots.pos, positions, scale, window, **changes, prefix=prefix)


def span_attention(
    layer: RKVLayer, query: Tensor, padding: Tensor | None, positions: Tensor, scale: float, changes: dict
) -> Tensor:
    """A multi-token forward: attention over the used slots and the new tokens, staged by the layer, which then
    appends the new tokens (or keeps ``budget`` of them all)."""
    length = query.shape[2]
    empty = not any(layer.shared.plan.used_before)
    dense = layer.config.attention == "sdpa" or empty
    columns = length if dense else span_length(length)
    span = StagedSpan(layer.stage(query, padding, scale, columns), columns, dense, empty)
    out = attend_staged(layer, span, query, positions, scale, changes)
    layer.keep_for_readers(span)
    layer.commit(span.slots)
    return out


def attend_staged(
    layer: RKVLayer, span: StagedSpan, query: Tensor, positions: Tensor, scale: float, changes: dict
) -> Tensor:
    """``query`` [B, Hq, L, D] (the span's queries, or its last L for a reader) over a staged span's slots."""
    staged, window, length = span.slots, layer.sliding_window, query.shape[2]
    keys, values, valid, pos = staged.keys, staged.values, staged.valid, staged.pos
    if span.empty:  # nothing before these tokens: causal attention among them, no kernel to compile
        new = slice(keys.shape[2] - span.columns, None)
        keys, values, valid, pos = keys[:, :, new], values[:, :, new], valid[:, :, new], pos[:, :, new]
    out = None
    if not span.dense:
        extra = span.columns - length
        staged_query = torch.cat([query, query.new_zeros(*query.shape[:2], extra, query.shape[-1])], dim=2)
        query_pos = torch.cat([positions, positions.new_full((positions.shape[0], extra), -1)], dim=1)
        sink_slot = layer.staged_sink_slot
        out = layer.shared.kernels.span(
            staged_query, keys, values, valid, pos, query_pos, scale, window, **changes, sink_slot=sink_slot
        )
        out = None if out is None else out[:, :, :length]
    if out is None:
        out = masked_sdpa(query, keys, values, valid, pos, positions, scale, window, **changes)
    return out


def cache_free_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    padding: Tensor | None,
    position_ids: Tensor | None,
    scale: float,
    kwargs: dict,
    shares_kv: bool = False,
) -> Tensor:
    """A patched model run without an RKVCache: exact causal attention over this forward's own tokens (a KV-sharing
    layer of Gemma 4 may ask it for the last of them only)."""
    batch, kv_heads, length = key.shape[:3]
    if length != query.shape[2] and not shares_kv:
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
    query_positions = position_ids[:, length - query.shape[2] :]
    window = kwargs.get("sliding_window")
    return masked_sdpa(query, key, value, valid, pos, query_positions, scale, window, **changes)


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
    """transformers mask interface: hand attention only the new tokens' padding [B, 1, 1, L] (None when decoding).

    The slot rule replaces the causal mask, so nothing else is needed; returning None for single-token steps keeps
    the decode inputs static. The mask is 4-D with one query row, so a model that keeps only its last queries for
    some layers (Gemma 4 slices the masks' query dimension) leaves it whole.
    """
    if attention_mask is None or q_length == 1:
        return None
    return attention_mask[:, None, None, -q_length:].to(torch.bool)
