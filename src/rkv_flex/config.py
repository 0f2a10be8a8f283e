"""RKVConfig: every knob of the slot cache, validated once, frozen."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

POLICY_NAMES = ("auto", "rkv", "snapkv", "streaming", "h2o", "random", "full", "triattention")
ATTENTION_BACKENDS = ("flex", "sdpa")
ALLOCATIONS = ("uniform", "adaptive")
# Policies whose scores rank positions the same way in every head: nothing for an adaptive allocation to go by.
HEAD_BLIND_POLICIES = ("streaming", "full")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RKVConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"RKVConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class RKVConfig:
    """How many KV slots each layer keeps and how it chooses them.

    Per layer, per sequence and per KV head the cache holds at most ``budget + buffer`` slots. When a new token
    finds them all used, the cache is compacted back to ``budget``: the ``window`` newest tokens always stay, the
    other ``budget - window`` are the best by the policy's score.

    Args:
        budget: slots kept after each compaction.
        buffer: slots filled by decoding between two compactions (the compaction interval).
        window: newest tokens always kept; their queries are the observation window of the attention scores.
        lam: R-KV mixing weight, score = lam * importance - (1 - lam) * redundancy. 1.0 is pure importance.
        kernel: max-pool width applied to importance along token order (odd).
        threshold: cosine similarity above which two keys count as near-duplicates (R-KV redundancy).
        policy: "auto" (the default: "triattention" where it can read the model's RoPE, "rkv" otherwise), "rkv",
            "snapkv", "streaming", "h2o", "random", "full", "triattention", a
            :class:`~rkv_flex.policies.Policy`, or a scoring callable ``(SlotState) -> Tensor``.
        statistics: "triattention": a file of per-head query statistics written by ``rkv-flex calibrate``; None
            (the default) keeps running statistics of the model's own queries instead (online).
        compact_prompt: a prompt that does not fit the slots is compacted while it is read (chunk by chunk); False
            refuses such a prompt instead (nothing of the prompt is ever evicted before decoding starts).
        prefill_chunk: prompt tokens fed per forward by ``generate`` (both paths) and the engine; None feeds the
            whole prompt at once. Peak memory is set by ``budget + buffer + prefill_chunk``, not the prompt.
        sinks: first tokens the "streaming" policy always keeps (attention sinks).
        attention: "flex" (compiled FlexAttention for decoding) or "sdpa" (exact dense-mask reference).
        seed: seed of the "random" policy's per-token priorities.
        allocation: "uniform" (every KV head keeps ``budget``) or "adaptive" (each layer keeps ``budget`` x its KV
            heads in total, shared out by score across heads; the same memory, see docs/method.md).
        head_floor: adaptive: every head keeps at least this fraction of ``budget`` (and at least its window).
        head_ceiling: adaptive: no head keeps more than this multiple of ``budget`` (it bounds the per-head view
            that compaction scores, so compaction costs at most this much more than uniform's).
        check_kernels: before a compiled FlexAttention kernel serves a shape, compare it once with the dense SDPA
            reference on synthetic slots of that shape, and use SDPA for shapes where it is wrong (torch's compiled
            CPU flex is wrong for some shapes on some machines). False trusts flex unchecked.
    """

    budget: int
    buffer: int = 128
    window: int = 8
    lam: float = 0.1
    kernel: int = 7
    threshold: float = 0.5
    policy: Any = "auto"
    compact_prompt: bool = True
    prefill_chunk: int | None = 512
    sinks: int = 4
    attention: str = "flex"
    seed: int = 0
    allocation: str = "uniform"
    head_floor: float = 0.2
    head_ceiling: float = 2.0
    check_kernels: bool = True
    statistics: str | None = None

    def __post_init__(self) -> None:
        _require_int("budget", self.budget, 1)
        _require_int("buffer", self.buffer, 1)
        _require_int("window", self.window, 1)
        _require_int("kernel", self.kernel, 1)
        _require_int("sinks", self.sinks, 0)
        _require_int("seed", self.seed, 0)
        if self.prefill_chunk is not None:
            _require_int("prefill_chunk", self.prefill_chunk, 1)
        if self.budget < self.window:
            raise ValueError(
                f"RKVConfig.budget ({self.budget}) must be >= RKVConfig.window ({self.window}): "
                "the window's tokens are always kept"
            )
        if self.kernel % 2 == 0:
            raise ValueError(f"RKVConfig.kernel must be a positive odd number, got {self.kernel}")
        for name in ("lam", "threshold", "head_floor", "head_ceiling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RKVConfig.{name} must be a number, got {type(value).__name__} {value!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"RKVConfig.lam must be in [0, 1], got {self.lam}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"RKVConfig.threshold is a cosine similarity and must be in [-1, 1], got {self.threshold}")
        if isinstance(self.policy, str):
            if self.policy not in POLICY_NAMES:
                raise ValueError(f"RKVConfig.policy {self.policy!r} is unknown; choose one of {POLICY_NAMES}")
        elif not callable(self.policy):
            raise TypeError(
                f"RKVConfig.policy must be one of {POLICY_NAMES}, a Policy or a callable scorer, "
                f"got {type(self.policy).__name__}"
            )
        if self.policy == "streaming" and self.sinks > self.budget - self.window:
            raise ValueError(
                f"RKVConfig.sinks ({self.sinks}) + window ({self.window}) must fit in budget ({self.budget})"
            )
        if self.statistics is not None:
            if self.policy != "triattention":
                raise ValueError(f"RKVConfig.statistics is for policy='triattention', not {self.policy!r}")
            if not isinstance(self.statistics, str) or not os.path.isfile(self.statistics):
                raise ValueError(f"RKVConfig.statistics: no calibration file at {self.statistics!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"RKVConfig.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not 0.0 <= self.head_floor <= 1.0:
            raise ValueError(f"RKVConfig.head_floor (a fraction of budget) must be in [0, 1], got {self.head_floor}")
        if self.head_ceiling < 1.0:
            raise ValueError(f"RKVConfig.head_ceiling (a multiple of budget) must be >= 1, got {self.head_ceiling}")
        if self.allocation == "adaptive" and self.policy in HEAD_BLIND_POLICIES:
            raise ValueError(
                f"RKVConfig.allocation='adaptive' needs scores that differ between heads; policy {self.policy!r} "
                "ranks positions the same way in every head (use allocation='uniform')"
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"RKVConfig.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        for name in ("compact_prompt", "check_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RKVConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def resolved(self, triattention_serves: bool) -> RKVConfig:
        """This config with ``policy="auto"`` made concrete: TriAttention where it can score the model's keys (it
        reads their RoPE), R-KV where it cannot; any other policy as it is. The default was chosen by the rule of
        ``bench/choose_default.py`` (docs/benchmarks.md)."""
        if self.policy != "auto":
            return self
        return replace(self, policy="triattention" if triattention_serves else "rkv")

    @property
    def floor_slots(self) -> int:
        """Adaptive: the fewest slots a head keeps."""
        return max(self.window, math.ceil(self.head_floor * self.budget))

    @property
    def ceiling_slots(self) -> int:
        """Adaptive: the most slots a head keeps."""
        return max(self.budget, math.floor(self.head_ceiling * self.budget))

    @property
    def capacity(self) -> int:
        """Slots allocated per layer: the most the cache ever holds."""
        return self.budget + self.buffer
