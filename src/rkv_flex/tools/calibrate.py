"""``rkv-flex calibrate``: TriAttention's query statistics of a model over a text, written to a file.

The text is read through the patched model in pieces, as a prompt is, with nothing evicted (the online statistics of
the cache are the calibration: one implementation of the accumulation), and each attention layer's per-head means
are saved in the format :mod:`rkv_flex.calibration` documents.
"""

from __future__ import annotations

from typing import Any

import torch

from ..calibration import save_statistics
from ..config import RKVConfig
from ..forward import feed, prompt_pieces
from ..patch import make_cache, patch_model, unpatch_model


@torch.no_grad()
def calibrate(model: Any, input_ids: torch.Tensor, path: str, chunk: int = 512) -> int:
    """Write the statistics of ``model`` (unpatched) over ``input_ids`` [1, T] to ``path``; returns T."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"calibration reads one sequence [1, T] of at least one token, got {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    # nothing evicted: every layer's queries are those of the full cache (a later layer's depend on what an earlier
    # layer attended)
    config = RKVConfig(budget=length, buffer=chunk, policy="triattention", prefill_chunk=chunk)
    patch_model(model, config)
    try:
        cache = make_cache(model)
        mask = torch.ones_like(input_ids)
        feed(model, cache, input_ids, mask, 0, prompt_pieces(length, config))
        moments = {layer.index: layer.query_moments[0] for layer in cache.attention}
        save_statistics(path, model.config.model_type, moments, tokens=length)
    finally:
        unpatch_model(model)
    return length
