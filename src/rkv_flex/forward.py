"""One model forward over a span of a token sequence, and prompts read in pieces: what every driver shares."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .cache import RKVCache

if TYPE_CHECKING:
    from .config import RKVConfig


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


def prompt_pieces(length: int, config: RKVConfig, padded: int = 0) -> list[int]:
    """The forwards ``length`` prompt tokens are read in, on every path: ``prefill_chunk`` tokens each, or one
    forward when prompts may not be compacted (``compact_prompt=False``) or ``prefill_chunk`` is None. The first
    ``padded`` tokens hold some row's padding: they are read at least two at a time, because a forward of one
    token is a decoding step, which writes its token as real."""
    chunk = config.prefill_chunk if config.compact_prompt and config.prefill_chunk else length
    pieces, start = [], 0
    while start < length:
        size = min(max(chunk, 2 if start < padded else 1), length - start)
        pieces.append(size)
        start += size
    return pieces


def padded_columns(attention_mask: Tensor) -> int:
    """How many leading columns hold some row's padding (left padding)."""
    padding = (attention_mask == 0).any(dim=0).nonzero()
    return int(padding[-1]) + 1 if len(padding) else 0


@torch.no_grad()
def feed(
    model: Any, cache: RKVCache, input_ids: Tensor, attention_mask: Tensor, start: int, pieces: list[int]
) -> Tensor | None:
    """Feed columns from ``start`` in forwards of ``pieces`` tokens; returns the last position's logits [B, V], or
    None when there was nothing to feed."""
    positions = positions_from_mask(attention_mask)
    logits = None
    for first, size in zip(itertools.accumulate(pieces, initial=start), pieces, strict=False):
        logits = forward_span(model, cache, input_ids, attention_mask, positions, first, first + size, 1)
    return None if logits is None else logits[:, -1]
