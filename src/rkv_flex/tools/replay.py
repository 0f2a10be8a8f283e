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

from ..cache import RKVCache
from ..config import RKVConfig
from ..forward import forward_span, positions_from_mask, prompt_pieces
from ..planner import Planner


def fill_aligned_chunks(
    prompt: int, total: int, config: RKVConfig, evicts: bool = True, step: int | None = None
) -> list[int]:
    """Lengths of the chunks after the prompt, up to ``total`` tokens, each ending at or before a fill point.

    ``step`` caps every chunk (e.g. for finer snapshots); chunks never exceed the free slots.
    """
    planner = Planner(config, 1, config.capacity, evicts)
    for size in prompt_pieces(prompt, config):
        planner.plan(size)
        planner.ran()
    chunks, remaining = [], total - prompt
    while remaining > 0:
        free = planner.capacity - planner.used[0] if evicts else remaining
        if free == 0:  # the next token compacts first
            free = planner.capacity - config.budget
        size = min(free, remaining, step or free)
        planner.plan(size)
        planner.ran()
        chunks.append(size)
        remaining -= size
    return chunks


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
    """Feed ``input_ids`` [B, T] through ``model`` with ``cache``: the prompt (the first ``prompt`` columns) as
    ``generate`` feeds it, the rest in fill-aligned chunks. Yields ``(start, logits)`` per forward after the
    prompt's last chunk: ``logits`` [B, L, V] predict the tokens at ``start + 1 .. start + L`` (the prompt's are its
    last position only).

    ``after_chunk(cache, fed)`` runs after every forward (e.g. to snapshot what the slots hold).
    """
    _batch, total = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = positions_from_mask(attention_mask)
    config = cache.config
    bounds = list(itertools.accumulate(prompt_pieces(prompt, config), initial=0))
    last_prompt_chunk = len(bounds) - 2
    for size in fill_aligned_chunks(prompt, total, config, cache.evicts, step):
        bounds.append(bounds[-1] + size)
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        in_prompt = index <= last_prompt_chunk
        logits = forward_span(model, cache, input_ids, attention_mask, positions, start, end, 1 if in_prompt else 0)
        if after_chunk is not None:
            after_chunk(cache, end)
        if index == last_prompt_chunk:
            yield end - 1, logits
        elif not in_prompt:
            yield start, logits
