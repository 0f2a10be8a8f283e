"""How many KV slots a request holds in vLLM's pages after each step.

vLLM's scheduler allocates and frees a request's KV blocks, and its workers write and compact them. Both must agree
on every request's physical length (slots held), which is no longer its token count once tokens are evicted. They
agree without talking to each other because the physical length is a pure function of what both see: the tokens
each step schedules for the request, and the settings.

The rule is rkv_flex's (docs/method.md): a request holds at most ``budget + buffer`` slots per layer and KV head. A
step writes its new tokens after the slots held and attends all of them; when that fills or overflows the capacity,
the request is compacted back to ``budget`` right after the step's forward, using the queries of its newest tokens.
For decoding (one token per step) this keeps exactly what rkv_flex's transformers path keeps, which compacts before
the token that would overflow, with the same queries. So does a prompt chunk that fits, or one longer than
``buffer``. A chunk of at most ``buffer`` tokens that overflows differs: it is attended with everything held and then
compacted, where the transformers path compacts first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One scheduled step of one request, as both sides compute it."""

    held: int  # slots held when the step starts: its new tokens go to the slots after these
    attended: int  # slots the step's forward writes up to and attends: held + new tokens
    compacts: bool  # the request is compacted back to ``budget`` right after the forward
    after: int  # slots held when the step ends


def next_step(held: int, new_tokens: int, budget: int, buffer: int) -> Step:
    """The step that schedules ``new_tokens`` for a request holding ``held`` slots."""
    if new_tokens < 1 or held < 0:
        raise ValueError(f"a step schedules at least one token over a non-negative length, got {new_tokens}, {held}")
    attended = held + new_tokens
    compacts = attended >= budget + buffer
    return Step(held, attended, compacts, budget if compacts else attended)


def held_after(steps: Iterable[int], budget: int, buffer: int) -> int:
    """Slots held after steps of these many new tokens each, from an empty request."""
    held = 0
    for new_tokens in steps:
        held = next_step(held, new_tokens, budget, buffer).after
    return held


def blocks_for(slots: int, block_size: int) -> int:
    """KV blocks that hold ``slots`` slots."""
    return -(-slots // block_size)
