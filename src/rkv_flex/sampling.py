"""Choosing each row's next token on the device: greedy, or a sample after temperature, top-k and top-p.

Every row has its own settings, held as tensors, so one graph serves any mix of requests. Three variants exist
because their costs differ by orders of magnitude on a CPU (sorting a vocabulary per row is what top-p needs):
``greedy`` (argmax), ``sample`` (temperature only) and ``filtered`` (top-k and top-p too). The host picks the
cheapest variant that covers every active row.

Random numbers come from a counter-based hash of (row seed, row step, token id): a request draws the same
numbers whatever else is in the batch, so a seeded request gives the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VARIANTS = ("greedy", "sample", "filtered")


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")

    @property
    def variant(self) -> str:
        if not self.do_sample:
            return "greedy"
        return "filtered" if self.top_p < 1 or self.top_k else "sample"


def cheapest_variant(params: list[SamplingParams]) -> str:
    """The variant that serves every one of ``params``."""
    return max((p.variant for p in params), key=VARIANTS.index, default="greedy")


@dataclass
class RowSampling:
    """Per-row settings on the device, [B] each."""

    temperature: Tensor
    top_p: Tensor
    top_k: Tensor
    greedy: Tensor
    seed: Tensor

    @classmethod
    def allocate(cls, batch: int, device: torch.device) -> RowSampling:
        return cls(
            temperature=torch.ones(batch, device=device),
            top_p=torch.ones(batch, device=device),
            top_k=torch.zeros(batch, dtype=torch.long, device=device),
            greedy=torch.ones(batch, dtype=torch.bool, device=device),
            seed=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def set_row(self, row: int, params: SamplingParams) -> None:
        self.temperature[row] = params.temperature if params.do_sample else 1.0
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.greedy[row] = not params.do_sample
        self.seed[row] = params.seed


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2**32`` for 0 <= x < 2**32 without int64 overflow (16-bit halves)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (lowbias32): nearby inputs give independent-looking outputs."""
    x = x & _MASK32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """U(0, 1) [B, V] from (seed, step) per row and the token id: reproducible per request."""
    row = _hash32(_hash32(seed) ^ _hash32(step + 0x9E3779B9))
    token = _hash32(torch.arange(vocab, device=seed.device))
    bits = _hash32(row[:, None] ^ token[None, :]) >> 8  # 24 random bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: Tensor, temperature: Tensor | float, top_p: Tensor | float, top_k: Tensor | int) -> Tensor:
    """Float logits [B, V] after temperature, top-k and top-p (per row, or one value for all), filtered tokens at
    -inf: what a sample draws from. top-k 0 and top-p 1 filter nothing."""
    logits = logits.float() / (torch.as_tensor(temperature, device=logits.device).reshape(-1, 1))
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    top_k = torch.as_tensor(top_k, device=logits.device).reshape(-1, 1)
    outside = (top_k > 0) & (rank >= top_k)
    ordered = ordered.masked_fill(outside, float("-inf"))
    probs = ordered.softmax(dim=-1)
    top_p = torch.as_tensor(top_p, device=logits.device, dtype=probs.dtype).reshape(-1, 1)
    # the top token is always inside; top-p 1 filters nothing (a float cumsum may pass 1 by rounding)
    outside = outside | ((top_p < 1) & (probs.cumsum(dim=-1) - probs > top_p))
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def choose(logits: Tensor, rows: RowSampling, step: Tensor, variant: str) -> Tensor:
    """Next token ids [B] from last-position logits [B, V], per row's settings.

    A sample is drawn by the exponential race ``argmax(p / E)``, E ~ Exp(1), which samples exactly from p; its
    random stream differs from transformers' multinomial.
    """
    greedy = logits.argmax(dim=-1)
    if variant == "greedy":
        return greedy
    if variant == "filtered":
        filtered = filter_logits(logits, rows.temperature, rows.top_p, rows.top_k)
    else:
        filtered = logits.float() / rows.temperature[:, None]
    probs = filtered.softmax(dim=-1)
    race = -torch.log(uniform_noise(rows.seed, step, logits.shape[-1]))
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(rows.greedy, greedy, sampled)
