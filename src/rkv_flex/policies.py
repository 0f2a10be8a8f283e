"""Eviction policies: one small scoring class each, all over the same slot state.

A policy maps a :class:`SlotState` to a score per slot, [B, Hkv, S]; higher is kept. The cache always keeps the
``window`` newest slots and never keeps an invalid one, whatever the score says, so a policy only ranks the rest.
Any callable ``(SlotState) -> Tensor`` works as a policy (see ``examples/custom_policy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .scoring import importance, redundancy

if TYPE_CHECKING:
    from .config import RKVConfig


@dataclass(frozen=True)
class SlotState:
    """What a policy may look at for one layer: the slots and the last observation queries."""

    keys: Tensor  # [B, Hkv, S, D], post-RoPE
    values: Tensor  # [B, Hkv, S, D]
    valid: Tensor  # [B, Hkv, S] bool: the slot holds a real token
    pos: Tensor  # [B, Hkv, S] int64: absolute position of the slot's token
    window: Tensor  # [S] bool: the newest slots, always kept
    queries: Tensor  # [B, Hq, W, D] post-RoPE queries of the last W tokens
    query_valid: Tensor  # [B, W] bool
    attention_sum: Tensor | None = None  # [B, Hkv, S] fp32 attention each slot received so far (policies that track it)

    @property
    def candidates(self) -> Tensor:
        """Valid slots outside the window: the ones a policy ranks."""
        return self.valid & ~self.window


@dataclass(frozen=True)
class RKV:
    """R-KV: ``lam * importance - (1 - lam) * redundancy``."""

    lam: float = 0.1
    kernel: int = 7
    threshold: float = 0.5
    tracks_attention = False
    evicts = True

    def __call__(self, state: SlotState) -> Tensor:
        attention = importance(state.queries, state.query_valid, state.keys, state.candidates, self.kernel)
        if self.lam == 1.0:
            return attention
        return self.lam * attention - (1.0 - self.lam) * redundancy(state.keys, state.valid, self.threshold)


@dataclass(frozen=True)
class SnapKV:
    """SnapKV applied at every compaction: pooled attention of the observation window (R-KV with lam = 1)."""

    kernel: int = 7
    tracks_attention = False
    evicts = True

    def __call__(self, state: SlotState) -> Tensor:
        return importance(state.queries, state.query_valid, state.keys, state.candidates, self.kernel)


@dataclass(frozen=True)
class Streaming:
    """StreamingLLM: the first ``sinks`` tokens (attention sinks) and the most recent ones."""

    sinks: int = 4
    tracks_attention = False
    evicts = True

    def __call__(self, state: SlotState) -> Tensor:
        recency = state.pos.float()
        is_sink = state.valid & (state.valid.cumsum(dim=-1) <= self.sinks)
        return recency.masked_fill(is_sink, torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class H2O:
    """H2O: heavy hitters by attention accumulated over every query since the token entered the cache."""

    tracks_attention = True
    evicts = True

    def __call__(self, state: SlotState) -> Tensor:
        if state.attention_sum is None:
            raise ValueError("the H2O policy needs the cache to track attention sums (attention_sum is None)")
        return state.attention_sum


@dataclass(frozen=True)
class Random:
    """Control: a fixed pseudo-random priority per (sequence, head, position), the same at every compaction."""

    seed: int = 0
    tracks_attention = False
    evicts = True

    def __call__(self, state: SlotState) -> Tensor:
        batch, heads, _ = state.pos.shape
        row = torch.arange(batch * heads, device=state.pos.device).reshape(batch, heads, 1)
        mixed = (state.pos * 2654435761 + row * 40503 + self.seed * 97) % 2147483647
        return (mixed * 48271 % 2147483647).float()


@dataclass(frozen=True)
class Full:
    """No eviction: the cache grows instead, on the same code path (for comparisons)."""

    tracks_attention = False
    evicts = False

    def __call__(self, state: SlotState) -> Tensor:
        raise RuntimeError("the 'full' policy never compacts; it has no scores")


def is_builtin(policy: object) -> bool:
    return isinstance(policy, (RKV, SnapKV, Streaming, H2O, Random, Full))


def make_policy(config: RKVConfig):
    """The policy object for ``config.policy`` (a name, or a user callable returned as is)."""
    if callable(config.policy):
        return config.policy
    return {
        "rkv": lambda: RKV(config.lam, config.kernel, config.threshold),
        "snapkv": lambda: SnapKV(config.kernel),
        "streaming": lambda: Streaming(config.sinks),
        "h2o": H2O,
        "random": lambda: Random(config.seed),
        "full": Full,
    }[config.policy]()
