"""How many KV slots a request holds in vLLM's pages, step by step.

vLLM's scheduler allocates and frees a request's KV blocks, and its workers write and compact them. Both must agree
on every request's physical length (slots held), which is no longer its token count once tokens are evicted. They
agree without talking to each other because the physical length is a pure function of what both see: the tokens
each step schedules for the request, and the settings.

The rule is rkv_flex's planner (docs/method.md), per request: a step's new tokens are appended when they fit in
``budget + buffer`` slots; when they do not, the request is first compacted back to ``budget`` (with the queries
of its newest tokens) if the new tokens then fit; otherwise (a prompt chunk longer than ``buffer``) the step
attends everything held plus the new tokens and keeps ``budget`` right after its forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One scheduled step of one request, as both sides compute it."""

    held: int  # slots held when the step starts
    compacts_first: bool  # compacted back to ``budget`` before the new tokens are written
    attended: int  # slots the step's forward writes up to and attends (new tokens after the held ones)
    compacts_after: bool  # the new tokens did not fit even after a compaction: ``budget`` kept after the forward
    after: int  # slots held when the step ends


def next_step(held: int, new_tokens: int, budget: int, buffer: int) -> Step:
    """The step that schedules ``new_tokens`` for a request holding ``held`` slots."""
    if new_tokens < 1 or held < 0:
        raise ValueError(f"a step schedules at least one token over a non-negative length, got {new_tokens}, {held}")
    capacity = budget + buffer
    if held + new_tokens <= capacity:
        return Step(held, False, held + new_tokens, False, held + new_tokens)
    if budget + new_tokens <= capacity:
        return Step(held, True, budget + new_tokens, False, budget + new_tokens)
    return Step(held, False, held + new_tokens, True, budget)


def held_after(steps: Iterable[int], budget: int, buffer: int) -> int:
    """Slots held after steps of these many new tokens each, from an empty request."""
    held = 0
    for new_tokens in steps:
        held = next_step(held, new_tokens, budget, buffer).after
    return held


def blocks_for(slots: int, block_size: int) -> int:
    """KV blocks that hold ``slots`` slots."""
    return -(-slots // block_size)
