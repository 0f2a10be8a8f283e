"""Eviction policies: one small scoring class each, all over the same slot state (in the manner of kvpress presses).

A :class:`Policy` maps a :class:`SlotState` to a score per slot, [B, Hkv, S]; higher is kept. The cache always keeps
the ``window`` newest slots and never keeps an invalid one, whatever the score says, so a policy only ranks the
rest. Two class attributes tell the cache what a policy needs: ``evicts`` (False: the cache grows instead) and
``tracks_attention`` (the cache accumulates the attention every slot receives, for H2O). ``traceable`` says
whether the policy may run inside the compiled compaction graph. Any plain callable ``(SlotState) -> Tensor`` is
wrapped as a :class:`ScoringFunction`, whose output is checked at every compaction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .scoring import frequency_scores, importance, redundancy

if TYPE_CHECKING:
    from .config import RKVConfig
    from .rope import Rope


@dataclass(frozen=True)
class SlotState:
    """What a policy may look at for one layer: the slots and the last observation queries."""

    keys: Tensor  # [B, Hkv, S, D], post-RoPE
    values: Tensor  # [B, Hkv, S, Dv]
    valid: Tensor  # [B, Hkv, S] bool: the slot holds a real token
    pos: Tensor  # [B, Hkv, S] int64: absolute position of the slot's token
    window: Tensor  # [B, 1, S] bool: the newest slots of each row, always kept
    queries: Tensor  # [B, Hq, W, D] post-RoPE queries of the last W tokens
    query_valid: Tensor  # [B, W] bool
    attention_sum: Tensor | None = None  # [B, Hkv, S] fp32 attention each slot received (policies that track it)
    scaling: float = 1.0  # the attention's query scaling (the model's, e.g. head_dim ** -0.5)
    softcap: float | None = None  # the model's attention logit soft-cap (Gemma 2), if any
    query_center: Tensor | None = None  # [B or 1, Hq, D] fp32 mean pre-RoPE query (policies that track queries)
    query_magnitude: Tensor | None = None  # [B or 1, Hq, D/2] fp32 mean magnitude of each query pair
    rope: Rope | None = None  # the layer's rotation (policies that track queries)

    @property
    def candidates(self) -> Tensor:
        """Valid slots outside the window: the ones a policy ranks."""
        return self.valid & ~self.window


class Policy(ABC):
    """Base of every eviction policy: ``policy(state) -> scores [B, Hkv, S]``, higher kept."""

    evicts: ClassVar[bool] = True
    tracks_attention: ClassVar[bool] = False
    tracks_queries: ClassVar[bool] = False  # the cache keeps per-head statistics of the pre-RoPE queries
    traceable: ClassVar[bool] = True

    @abstractmethod
    def __call__(self, state: SlotState) -> Tensor: ...


@dataclass(frozen=True)
class RKV(Policy):
    """R-KV: ``lam * importance - (1 - lam) * redundancy``, the redundancy counted from its uniform share ``1 / n``
    (n valid slots of the head). The offset changes no head's ranking; it makes each head's scores sum to its
    importance mass, comparable across heads (head-adaptive budgets, docs/method.md 4.1)."""

    lam: float = 0.1
    kernel: int = 7
    threshold: float = 0.5

    def __call__(self, state: SlotState) -> Tensor:
        attention = importance(
            state.queries, state.query_valid, state.keys, state.candidates, self.kernel, state.scaling, state.softcap
        )
        if self.lam == 1.0:
            return attention
        uniform = 1.0 / state.valid.sum(dim=-1, keepdim=True).clamp(min=1)
        excess = redundancy(state.keys, state.valid, self.threshold) - uniform
        return self.lam * attention - (1.0 - self.lam) * excess


@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV applied at every compaction: pooled attention of the observation window."""

    kernel: int = 7

    def __call__(self, state: SlotState) -> Tensor:
        return importance(
            state.queries, state.query_valid, state.keys, state.candidates, self.kernel, state.scaling, state.softcap
        )


@dataclass(frozen=True)
class Streaming(Policy):
    """StreamingLLM: the first ``sinks`` tokens (attention sinks) and the most recent ones."""

    sinks: int = 4

    def __call__(self, state: SlotState) -> Tensor:
        recency = state.pos.float()
        is_sink = state.valid & (state.valid.cumsum(dim=-1) <= self.sinks)
        return recency.masked_fill(is_sink, torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class H2O(Policy):
    """H2O: heavy hitters by attention accumulated over every query since the token entered the cache."""

    tracks_attention: ClassVar[bool] = True

    def __call__(self, state: SlotState) -> Tensor:
        if state.attention_sum is None:
            raise ValueError("the H2O policy needs the cache to track attention sums (attention_sum is None)")
        return state.attention_sum


@dataclass(frozen=True)
class Random(Policy):
    """Control: a fixed pseudo-random priority per (KV head, position), the same at every compaction and for any
    row (so a request's choice does not depend on the row it decodes in). The priority is an integer hash of the
    position (xor-shift and multiply, whose products stay within int64), not a linear function of it, so kept
    positions form no lattice."""

    seed: int = 0

    def __call__(self, state: SlotState) -> Tensor:
        heads = state.pos.shape[1]
        head = torch.arange(heads, device=state.pos.device).reshape(1, heads, 1)
        return integer_hash(state.pos * 1000003 + head * 7919 + self.seed * 104729).float()


def integer_hash(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two rounds of xor-shift and multiply) of ``x`` [int64], as 24-bit priorities."""
    low32 = 0xFFFFFFFF
    x = x & low32
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & low32
    return ((x >> 16) ^ x) >> 8


@dataclass(frozen=True)
class TriAttention(Policy):
    """TriAttention (arXiv 2604.04921): each slot scored by the attention logit a head's mean pre-RoPE query would pay
    it from future positions ``now + 1, 2, 4, ..., horizon`` (averaged), plus the part of the query's magnitude the
    mean does not capture times the key's, per frequency pair; z-normalised per query head over the candidates and
    maxed over the KV group. Statistics come from the cache (online, or a calibration file); docs/method.md 5.5."""

    tracks_queries: ClassVar[bool] = True
    horizon: int = 65536

    def __call__(self, state: SlotState) -> Tensor:
        if state.query_center is None or state.rope is None:
            raise ValueError("the triattention policy needs query statistics and the layer's RoPE from the cache")
        now = state.pos.masked_fill(~state.valid, -1).amax(dim=(1, 2)) + 1  # the next token's position, per row
        return frequency_scores(
            state.keys, state.candidates, state.query_center, state.query_magnitude, state.rope, now, self.horizon
        )


@dataclass(frozen=True)
class Full(Policy):
    """No eviction: the cache grows instead, on the same code path (for comparisons)."""

    evicts: ClassVar[bool] = False

    def __call__(self, state: SlotState) -> Tensor:
        raise RuntimeError("the 'full' policy never compacts; it has no scores")


def check_scores(scores: Any, valid: Tensor) -> None:
    """A clear error for a policy that returns something the selection cannot use."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"a policy must return a torch.Tensor of scores, got {type(scores).__name__}")
    if scores.shape != valid.shape:
        raise ValueError(
            f"a policy must return scores of shape [batch, kv_heads, slots] = {tuple(valid.shape)}, "
            f"got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"a policy must return floating-point scores, got {scores.dtype}")
    if not torch.isfinite(scores[valid]).all():
        raise ValueError("a policy returned NaN or infinite scores on valid slots")


class ScoringFunction(Policy):
    """A user's scoring callable as a policy: scored eagerly, its output checked at every compaction."""

    traceable: ClassVar[bool] = False

    def __init__(self, function: Callable[[SlotState], Tensor]):
        self.function = function

    def __call__(self, state: SlotState) -> Tensor:
        scores = self.function(state)
        check_scores(scores, state.valid)
        return scores

    def __repr__(self) -> str:
        return f"ScoringFunction({self.function!r})"


def make_policy(config: RKVConfig) -> Policy:
    """The policy for ``config.policy``: a name, a Policy instance (used as is), or a scoring callable."""
    policy = config.policy
    if isinstance(policy, Policy):
        return policy
    if callable(policy):
        return ScoringFunction(policy)
    if policy == "auto":
        raise ValueError(
            "policy 'auto' depends on the model: resolve it first (RKVConfig.resolved, as patch_model does)"
        )
    return {
        "rkv": lambda: RKV(config.lam, config.kernel, config.threshold),
        "snapkv": lambda: SnapKV(config.kernel),
        "streaming": lambda: Streaming(config.sinks),
        "h2o": H2O,
        "random": lambda: Random(config.seed),
        "full": Full,
        "triattention": TriAttention,
    }[policy]()
