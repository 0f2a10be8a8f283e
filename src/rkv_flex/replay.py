"""Teacher-forced replay of a token sequence through a patched model, in chunks that end where the slots fill.

Decoding compacts when a new token finds the slots full. Feeding a known continuation in chunks that never straddle
that moment reproduces step-by-step decoding exactly (same compactions, same query windows, same kept slots; only
floating-point summation order differs), at the cost of a prefill instead of one forward per token.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .cache import RKVCache
from .config import RKVConfig


def fill_aligned_chunks(prompt: int, total: int, config: RKVConfig, evicts: bool = True, step: int | None = None):
    """Lengths of the chunks after the prompt, up to ``total`` tokens, each ending at or before a fill point.

    ``step`` caps every chunk (e.g. for finer snapshots); chunks never exceed the free slots.
    """
    if not evicts:
        return _split(total - prompt, step or max(1, total - prompt))
    used = config.budget if config.compact_prompt and prompt > config.budget else prompt
    if used > config.capacity:
        raise ValueError(f"a prompt of {prompt} tokens does not fit {config.capacity} slots without compaction")
    chunks, remaining = [], total - prompt
    while remaining > 0:
        free = config.capacity - used
        if free == 0:  # the next token compacts first
            used, free = config.budget, config.buffer
        size = min(free, remaining, step or free)
        chunks.append(size)
        used += size
        remaining -= size
    return chunks


def _split(length: int, step: int) -> list[int]:
    return [min(step, length - start) for start in range(0, length, step)]


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
def replay(
    model: Any,
    cache: RKVCache,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    prompt: int,
    step: int | None = None,
    after_chunk: Callable[[RKVCache, int], None] | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Feed ``input_ids`` [B, T] through ``model`` with ``cache``: the prompt (the first ``prompt`` columns) in one
    forward, the rest in fill-aligned chunks. Yields ``(start, logits)`` per chunk: ``logits`` [B, L, V] predict the
    tokens at ``start + 1 .. start + L`` (the first chunk is the prompt's last position only).

    ``after_chunk(cache, fed)`` runs after every forward (e.g. to snapshot what the slots hold).
    """
    _batch, total = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = positions_from_mask(attention_mask)
    evicts = getattr(cache.policy, "evicts", True)
    bounds = [0, prompt]
    for size in fill_aligned_chunks(prompt, total, cache.config, evicts, step):
        bounds.append(bounds[-1] + size)
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        logits = forward_span(model, cache, input_ids, attention_mask, positions, start, end, 1 if index == 0 else 0)
        if after_chunk is not None:
            after_chunk(cache, end)
        yield (end - 1 if index == 0 else start), logits
