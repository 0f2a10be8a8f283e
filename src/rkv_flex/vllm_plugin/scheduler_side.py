"""The scheduler's half: KV blocks counted by each request's physical length, and tail blocks given back.

vLLM counts a request's blocks from its token count. Here the two coordinator calls that size an allocation see the
slots the step will attend instead (``lengths.next_step``), and after each ``schedule()`` the blocks a scheduled
request no longer needs go back to the pool. They are freed after the step's allocations, so no other request can
be handed them before the next step; by then the worker has compacted (it does so before the step's forward).
"""

from __future__ import annotations

import inspect
from typing import Any

from ..config import RKVConfig
from .lengths import blocks_for, next_step


class SchedulerSide:
    """Per engine: each request's physical length as the scheduler mirrors it."""

    def __init__(self, scheduler: Any, settings: RKVConfig):
        self.scheduler, self.settings = scheduler, settings
        self.held: dict[str, int] = {}  # request id -> slots held after its last scheduled step
        self.freed = 0  # blocks given back while their request went on
        self.preemptions = 0
        coordinator = scheduler.kv_cache_manager.coordinator
        for name in ("get_num_blocks_to_allocate", "allocate_new_blocks"):
            setattr(coordinator, name, self.counted_by_slots(getattr(coordinator, name)))

    def counted_by_slots(self, method: Any) -> Any:
        """A coordinator method sizing an allocation, given the slots each request's step attends instead of its
        token count (both of its counts, ``num_tokens`` and ``num_tokens_main_model``, move by the same amount)."""
        signature = inspect.signature(method)

        def sized_by_slots(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            counts = bound.arguments
            fewer = self.evicted(counts["request_id"], counts["num_tokens_main_model"])
            counts["num_tokens"] -= fewer
            counts["num_tokens_main_model"] -= fewer
            return method(*bound.args, **bound.kwargs)

        return sized_by_slots

    def evicted(self, request_id: str, tokens_after_step: int) -> int:
        """Token count minus the slots the step attends, for the request's allocation this step."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return 0
        new_tokens = tokens_after_step - request.num_computed_tokens
        if new_tokens < 1:
            return 0
        step = next_step(self.held.get(request_id, 0), new_tokens, self.settings.budget, self.settings.buffer)
        return tokens_after_step - step.attended

    def scheduled(self, output: Any) -> None:
        """After ``schedule()``: advance each scheduled request's length and give back blocks it no longer needs."""
        for request_id in output.finished_req_ids:
            self.held.pop(request_id, None)
        managers = self.scheduler.kv_cache_manager.coordinator.single_type_managers
        for request_id, new_tokens in output.num_scheduled_tokens.items():
            step = next_step(self.held.get(request_id, 0), new_tokens, self.settings.budget, self.settings.buffer)
            keep = blocks_for(step.attended, managers[0].block_size)
            for manager in managers:
                blocks = manager.req_to_blocks[request_id]
                tail = blocks[keep:]
                if not tail:
                    continue
                del blocks[keep:]
                if request_id in manager.num_cached_block:
                    manager.num_cached_block[request_id] = min(manager.num_cached_block[request_id], keep)
                manager.block_pool.free_blocks(reversed(tail))
                self.freed += len(tail)
            self.held[request_id] = step.after

    def preempted(self, request_id: str) -> None:
        """vLLM frees every block of a preempted request and later recomputes it as a prompt."""
        self.held.pop(request_id, None)
        self.preemptions += 1
