"""The worker's half: each request's slots in its own pages, written after its physical end and compacted in place.

Before a step's forward (``_prepare_inputs``), every scheduled request is first compacted if the rule says so
(``lengths.next_step``; a previous step that attended more than the capacity is compacted now), its block-table row
is cut to the blocks the scheduler keeps, and after vLLM has computed the step's inputs, its new tokens' slots and
its attention length are moved to the physical ones. Positions stay logical, so RoPE is unchanged. During the
forward, each attention layer hands over the newest queries of each request, which the next compaction scores with.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import RKVConfig
from ..policies import make_policy
from .lengths import Step, blocks_for, next_step
from .pages import PageLayout, compact_slots, slabs

RETIRED_KEPT = 256


@dataclass
class RequestSlots:
    """One request as the worker holds it."""

    held: int = 0  # slots written
    compact_pending: bool = False  # the last step attended beyond the capacity: keep ``budget`` before anything
    kept: dict[int, Tensor] = field(default_factory=dict)  # layer -> [Hkv, k] positions kept by the last compaction
    appended: list[Tensor] = field(default_factory=list)  # positions written since, the same in every layer and head
    queries: dict[int, Tensor] = field(default_factory=dict)  # layer -> [Hq, <= window, D] newest queries
    recording: bool = False  # this step's queries may be among the newest ``window`` at the next compaction
    steps: list[int] = field(default_factory=list)  # tokens each of its steps fed (prompt chunks, then ones)
    compactions: int = 0
    recomputed: int = 0  # times vLLM preempted it and read it again from its first token

    def positions(self, layer: int, kv_heads: int) -> Tensor:
        """[Hkv, held]: the token position each slot of ``layer`` holds."""
        kept = self.kept.get(layer, torch.zeros(kv_heads, 0, dtype=torch.long))
        return torch.cat([kept, *(fresh.expand(kv_heads, -1) for fresh in self.appended)], dim=1)


class WorkerSide:
    """Per worker: the requests' slots, the layers' pages and how to address them."""

    def __init__(self, runner: Any, settings: RKVConfig, probe_layout: Any):
        self.runner, self.settings, self.policy = runner, settings, make_policy(settings)
        self.probe_layout = probe_layout
        self.requests: dict[str, RequestSlots] = {}
        self.batch: list[RequestSlots] = []  # the current step's requests, in the batch's order
        self.layouts: dict[tuple, PageLayout] = {}
        self.retired: dict[str, RequestSlots] = {}  # the last finished requests as they ended, for inspection

    # -- request lifecycle (from the scheduler's output) ----------------------------------------------------------
    def update(self, output: Any) -> None:
        for request_id in output.finished_req_ids:
            if request_id in self.requests:
                self.retired[request_id] = self.requests.pop(request_id)
        while len(self.retired) > RETIRED_KEPT:
            del self.retired[next(iter(self.retired))]
        started = [request.req_id for request in output.scheduled_new_reqs]
        for request_id in [*started, *output.scheduled_cached_reqs.resumed_req_ids]:
            previous = self.requests.get(request_id)  # a preempted request, read again from its first token
            self.requests[request_id] = RequestSlots(recomputed=0 if previous is None else previous.recomputed + 1)

    # -- before the forward ----------------------------------------------------------------------------------------
    def before_inputs(self, new_tokens: np.ndarray) -> list[Step]:
        """Compact and cut rows as each scheduled request's step says; returns the steps."""
        batch = self.runner.input_batch
        steps = []
        self.batch = []
        capacity = self.settings.budget + self.settings.buffer
        for row, request_id in enumerate(batch.req_ids[: batch.num_reqs]):
            request = self.requests[request_id]
            if request.compact_pending:
                self.compact(row, request_id, request)
            step = next_step(request.held, int(new_tokens[row]), self.settings.budget, self.settings.buffer)
            if step.compacts_first:
                self.compact(row, request_id, request)
            self.cut_row(row, request_id, blocks_for(step.attended, self.block_size))
            logical = int(batch.num_computed_tokens_cpu[row])
            request.appended.append(torch.arange(logical, logical + int(new_tokens[row])))
            request.held, request.compact_pending = step.attended, step.compacts_after
            # the next compaction scores with the newest ``window`` queries: those of a decoding step that leaves
            # fewer than ``window`` free slots, and every prompt chunk (it may be followed by a compaction)
            request.recording = new_tokens[row] > 1 or step.attended > capacity - self.settings.window
            request.steps.append(int(new_tokens[row]))
            steps.append(step)
            self.batch.append(request)
        return steps

    def after_inputs(self, steps: list[Step], new_tokens: np.ndarray) -> None:
        """vLLM computed slots and attention lengths from token counts: move them to the physical ones."""
        runner, batch = self.runner, self.runner.input_batch
        count = batch.num_reqs
        logical = batch.num_computed_tokens_cpu[:count].astype(np.int64)
        physical = np.array([step.attended - int(n) for step, n in zip(steps, new_tokens, strict=True)])
        evicted = logical - physical
        if not evicted.any():
            return
        per_token = torch.from_numpy(evicted[np.repeat(np.arange(count), new_tokens[:count])])
        tokens = int(new_tokens[:count].sum())
        batch.block_table.compute_slot_mapping(
            count, runner.query_start_loc.gpu[: count + 1], runner.positions[:tokens] - per_token
        )
        shorter = torch.from_numpy(evicted.astype(np.int32))
        runner.seq_lens[:count] -= shorter
        runner.optimistic_seq_lens_cpu[:count] -= shorter

    # -- during the forward ------------------------------------------------------------------------------------------
    def observe(self, layer_name: str, query: Tensor, query_start: Tensor) -> None:
        """An attention layer's post-RoPE queries [tokens, Hq, D]: keep each request's ``window`` newest."""
        if not any(request.recording for request in self.batch):  # most decoding steps
            return
        starts = query_start.tolist()
        if len(starts) != len(self.batch) + 1:  # not this step's forward (a warm-up run): nothing to record
            return
        layer, window = self.layer_of[layer_name], self.settings.window
        for row, request in enumerate(self.batch):
            if not request.recording:
                continue
            newest = query[max(starts[row], starts[row + 1] - window) : starts[row + 1]].transpose(0, 1)
            old = request.queries.get(layer)
            joined = newest if old is None else torch.cat([old, newest], dim=1)
            request.queries[layer] = joined[:, -window:].detach().clone()

    # -- compaction --------------------------------------------------------------------------------------------------
    def compact(self, row: int, request_id: str, request: RequestSlots) -> None:
        """Keep ``budget`` of the request's slots in every layer, in place."""
        block_ids = torch.from_numpy(self.row_blocks(row).copy())
        for layer, attention in self.layers:
            cache = attention.kv_cache
            layout = self.layout(attention, cache)
            queries = request.queries[layer]
            request.kept[layer] = compact_slots(
                self.policy,
                slabs(cache),
                layout,
                block_ids,
                request.positions(layer, cache.shape[1]),
                queries,
                torch.ones(queries.shape[1], dtype=torch.bool),
                self.settings.budget,
                self.settings.window,
                attention.impl.scale,
            )
        request.held, request.compact_pending, request.appended = self.settings.budget, False, []
        request.compactions += 1

    def cut_row(self, row: int, request_id: str, keep: int) -> None:
        """The request's block-table row and block list cut to ``keep`` blocks, as the scheduler cut its own."""
        for group, table in enumerate(self.runner.input_batch.block_table.block_tables):
            held = int(table.num_blocks_per_row[row])
            if held <= keep:
                continue
            table.block_table.np[row, keep:held] = 0
            table.num_blocks_per_row[row] = keep
            del self.runner.requests[request_id].block_ids[group][keep:]

    def row_blocks(self, row: int) -> np.ndarray:
        table = self.runner.input_batch.block_table.block_tables[0]
        return table.block_table.np[row, : table.num_blocks_per_row[row]]

    # -- the model's attention layers ----------------------------------------------------------------------------
    @functools.cached_property
    def layers(self) -> list[tuple[int, Any]]:
        """(decoder layer, attention module) of every layer with a KV cache, in order (read once the cache exists)."""
        context = self.runner.compilation_config.static_forward_context
        return sorted(((self.layer_of[name], context[name]) for name in self.layer_of), key=lambda pair: pair[0])

    @functools.cached_property
    def layer_of(self) -> dict[str, int]:
        """Each attention module's name -> its decoder layer (the attention hook is called by name)."""
        groups = self.runner.kv_cache_config.kv_cache_groups
        return {name: layer_index(name) for group in groups for name in group.layer_names}

    @property
    def block_size(self) -> int:
        return self.layers[0][1].kv_cache.shape[2]

    def layout(self, attention: Any, cache: Tensor) -> PageLayout:
        key = (attention.isa, cache.dtype, cache.shape[2], cache.shape[3] // 2)
        if key not in self.layouts:
            self.layouts[key] = self.probe_layout(*key)
        return self.layouts[key]


def layer_index(name: str) -> int:
    """The decoder layer of an attention module's name (``model.layers.3.self_attn.attn`` -> 3)."""
    found = re.search(r"layers\.(\d+)\.", name)
    if found is None:
        raise ValueError(f"cannot tell the decoder layer of attention module {name!r}")
    return int(found.group(1))
