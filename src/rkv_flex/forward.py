"""One model forward over a span of a token sequence, and prompts fed in chunks: what every driver shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .cache import RKVCache


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Absolute positions [B, T] as transformers derives them: real tokens count from 0, padding sits at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_span(
    model: Any,
    cache: RKVCache,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    start: int,
    end: int,
    logits_to_keep: int = 0,
) -> Tensor:
    """One forward of columns ``start:end`` through ``model`` with ``cache``; returns its logits."""
    return model(
        input_ids=input_ids[:, start:end],
        attention_mask=attention_mask[:, :end],
        position_ids=positions[:, start:end],
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    ).logits


@torch.no_grad()
def feed(
    model: Any,
    cache: RKVCache,
    input_ids: Tensor,
    attention_mask: Tensor,
    start: int,
    end: int,
    chunk: int | None,
) -> Tensor | None:
    """Feed columns ``start:end`` in forwards of at most ``chunk`` tokens (None: one forward); returns the last
    position's logits [B, V], or None when there was nothing to feed."""
    positions = positions_from_mask(attention_mask)
    step = chunk or max(1, end - start)
    logits = None
    for first in range(start, end, step):
        logits = forward_span(model, cache, input_ids, attention_mask, positions, first, min(first + step, end), 1)
    return None if logits is None else logits[:, -1]
