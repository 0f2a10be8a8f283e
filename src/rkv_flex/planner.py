"""Host-side decisions: what each forward does to the slots, from plain per-row counters (no device reads).

For a forward of ``length`` new tokens per row, each row either

* appends: the tokens fit in its free slots;
* compacts, then appends: its slots are full but ``budget + length`` fit -- during decoding, every ``buffer`` steps;
* stages: the tokens do not fit even after a compaction (a prompt chunk longer than ``buffer``). Attention then runs
  over the used slots plus the new tokens, and the row keeps ``budget`` of them right after.

Rows fed together in one multi-token forward are in lockstep (a left-padded batch, or one row being refilled);
single-token steps may find rows at different fill levels (continuous batching), each planned on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import RKVConfig


@dataclass(frozen=True)
class Plan:
    """One forward, as the host decided it."""

    rows: tuple[int, ...]  # the rows fed
    length: int  # new tokens per row
    staged: bool  # attention over the used slots + the new tokens, then ``budget`` kept
    compact: tuple[int, ...]  # rows compacted (back to ``budget``) before the forward
    grow_to: int | None  # a cache that never evicts reallocates to this many slots first
    used_before: tuple[int, ...]  # per fed row, slots used when the forward starts (after any compaction)
    seen_before: tuple[int, ...]  # per fed row, tokens fed before this forward
    used_after: tuple[int, ...]

    @property
    def in_lockstep(self) -> bool:
        return len(set(self.used_before)) == 1 and len(set(self.seen_before)) == 1

    @property
    def offset(self) -> int:
        """The slot of the first new token, for rows in lockstep."""
        return self.used_before[0]


class Planner:
    """Per-row counters of slots used and tokens seen, and the decision for every forward."""

    def __init__(self, config: RKVConfig, batch: int, capacity: int, evicts: bool):
        self.config, self.capacity, self.evicts = config, capacity, evicts
        self.used = [0] * batch
        self.seen = [0] * batch
        self.compactions = 0  # compaction events (one event may cover several rows)
        self.pending: Plan | None = None  # planned, not yet run

    @property
    def batch(self) -> int:
        return len(self.used)

    def plan(self, length: int, rows: Sequence[int] | None = None) -> Plan:
        """Decide a forward of ``length`` new tokens for ``rows`` (default all) and advance the counters."""
        if self.pending is not None:
            raise RuntimeError(f"a forward of {self.pending.length} tokens was planned but has not run")
        rows = tuple(range(self.batch)) if rows is None else tuple(rows)
        config, capacity = self.config, self.capacity
        used = {row: self.used[row] for row in rows}
        compact, staged, grow_to = [], False, None
        if not self.evicts:
            needed = max(used.values()) + length
            if needed > capacity:
                grow_to = self.capacity = max(needed, 2 * capacity)
        else:
            for row in rows:
                if used[row] + length <= capacity:
                    continue
                if self.seen[row] == 0 and not config.compact_prompt:
                    raise ValueError(
                        f"a prompt of {length} tokens does not fit the {capacity} slots (budget + buffer) and "
                        "RKVConfig.compact_prompt is False"
                    )
                if config.budget + length <= capacity:
                    compact.append(row)
                    used[row] = config.budget
                else:
                    staged = True
        plan = Plan(
            rows=rows,
            length=length,
            staged=staged,
            compact=tuple(compact),
            grow_to=grow_to,
            used_before=tuple(used[row] for row in rows),
            seen_before=tuple(self.seen[row] for row in rows),
            used_after=tuple(config.budget if staged else used[row] + length for row in rows),
        )
        if length > 1 and not plan.in_lockstep:
            raise RuntimeError("rows fed several tokens at once must be in lockstep (same slots used and tokens seen)")
        for row, after in zip(rows, plan.used_after, strict=True):
            self.used[row] = after
            self.seen[row] += length
        self.compactions += bool(compact) + staged
        self.pending = plan
        return plan

    def ran(self) -> Plan:
        """The planned forward is running: hand its plan over."""
        if self.pending is None:
            raise RuntimeError("a forward ran without a plan")
        plan, self.pending = self.pending, None
        return plan

    def cancel(self) -> None:
        """Forget a planned forward that never ran (a scheduler plans one step past the end of generation).
        Compactions it triggered have happened and stay."""
        plan, self.pending = self.pending, None
        if plan is None:
            return
        if plan.staged:
            raise RuntimeError("a staged forward cannot be cancelled")
        for row in plan.rows:
            self.used[row] -= plan.length
            self.seen[row] -= plan.length

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Rows start empty (a new prompt)."""
        for row in range(self.batch) if rows is None else rows:
            self.used[row] = self.seen[row] = 0
        if rows is None:
            self.compactions = 0
            self.pending = None

    def reorder(self, index: Sequence[int]) -> None:
        self.used = [self.used[i] for i in index]
        self.seen = [self.seen[i] for i in index]
