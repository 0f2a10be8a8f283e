"""Choosing the next token on the device: greedy, or a sample after temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Python constants: each distinct setting is its own (cached) graph."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {self.top_k!r}")


def filter_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """Float logits [..., V] after temperature, top-k and top-p, filtered tokens at -inf: what a sample draws from."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > sampling.top_p  # the top token is always inside
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def choose_next(logits: Tensor, sampling: Sampling) -> Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax, or a sample after temperature, top-k, top-p.

    Sampling draws by the exponential race (argmax of p / E, E ~ Exp(1)), which samples exactly from p and compiles
    to a fixed graph; its random stream differs from transformers' multinomial.
    """
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling).softmax(dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1.0)).argmax(dim=-1)
