"""The transformers ``Cache`` over slot storage: layers that store and stage tokens, and the planner that decides.

``RKVCache`` is what a patched model's ``generate`` receives. Every forward is of one of two kinds, decided by the
host before it runs (:class:`~rkv_flex.planner.Planner`, with any compaction it needs done first):

* a **decoding step**, one token per row: on the device every row's counters advance by one and each layer writes
  its token at the row's own count. This is the same code whether the step runs eagerly or inside a compiled graph
  (a compiled forward cannot plan, so its driver plans it with :meth:`RKVCache.begin_step`);
* a **span**, several tokens (a prompt chunk, a teacher-forced stretch), always eager: the host sets the counters
  from its plan and each layer stages the tokens for attention, then appends them, or keeps ``budget`` of them all.

The layers never ask which slot layout they hold (``slots.py``): uniform and pooled storage answer the same calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import RKVConfig
from .kernel_checks import KernelChecks
from .planner import Plan, Planner
from .policies import Policy, SlotState, make_policy
from .pool import allocate_slots
from .rope import Rope, pair_index, unrotated_sums
from .scoring import received_attention
from .slots import RowCounters, SlotStorage, static
from .state_layers import StateLayer


@dataclass(frozen=True)
class LayerSpec:
    """What the cache must know of one decoder layer."""

    query_group: int  # query heads per KV head
    sliding_window: int | None = None  # attention reaches this many positions back (None: all)
    sinks: bool = False  # learned attention sinks: one more slot, never holding a token, carries them
    rope: Rope | None = None  # the layer's rotation (TriAttention's score needs it)
    statistics: tuple[Tensor, Tensor] | None = None  # calibrated query centre [Hq, D] and magnitudes [Hq, D/2]
    latent: int | None = None  # MLA: the latent's channels; the key is [latent, rope key], the value the latent
    with_state: bool = False  # a Mamba mixer runs beside this attention and keeps its state in the same cache layer


@dataclass(frozen=True)
class SharesKV:
    """A layer that computes no keys or values of its own and attends those of an earlier layer (Gemma 3n and
    Gemma 4 share them from a cut-off layer on)."""

    source: int  # the model layer whose kept slots it reads


@dataclass
class SharedState:
    """What every layer of one cache reads: the per-row counters and the current forward's plan."""

    counters: RowCounters | None = None
    plan: Plan | None = None
    rows: slice = field(default_factory=lambda: slice(None))  # the rows this forward feeds (continuous batching)
    scaling: float | None = None  # the model's query scaling, learnt from the first attention call
    padded: bool = False  # some forward carried padding: the used slots may not all be valid
    first_attention: int = 0  # the model layer whose update starts a forward (the first attention layer)
    fed_on_device: bool = False  # which rows a step feeds is decided on the device (the engine's finished rows)
    lockstep_step: bool = False  # this eager forward is a decoding step feeding every row, rows in lockstep
    kernels: KernelChecks = field(default_factory=KernelChecks)  # compiled flex kernels, checked per shape


class RKVLayer(CacheLayerMixin):
    """One decoder layer's slots, as a transformers cache layer."""

    is_compileable = True
    is_sliding = False

    def __init__(self, config: RKVConfig, policy: Policy, spec: LayerSpec, shared: SharedState, index: int):
        super().__init__()
        self.config, self.policy, self.spec, self.shared, self.index = config, policy, spec, shared, index
        self.sliding_window = spec.sliding_window
        self.flex_decoding = False  # compiled decoding steps use flex (once checked for this shape), else SDPA
        self.capacity = config.capacity
        self.slots: SlotStorage | None = None
        self.incoming: tuple[Tensor, Tensor, Tensor] | None = None  # a span's K, V and positions
        self.softcap: float | None = None  # the model's score changes, learnt from its attention calls
        self.sinks: Tensor | None = None
        self.query_moments: Tensor | None = None  # [B, Hq, D + D/2 + 1]: sums of pre-RoPE queries, |pairs|, count
        self.rope: Rope | None = None  # the spec's rotation and calibrated statistics, on the layer's device
        self.pairs: tuple[Tensor, Tensor] | None = None  # each RoPE pair's dimensions, on the layer's device
        self.statistics: tuple[Tensor, Tensor] | None = None
        self.has_readers = False  # later layers attend these slots (KV sharing)
        self.last_span: StagedSpan | None = None  # what the last span attended, kept for the readers

    # -- allocation ---------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch = self.shared.counters.used.shape[0]  # every row, also when the first forward feeds one
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True
        tracks = self.policy.tracks_attention
        config = self.config if self.capacity == self.config.capacity else _with_capacity(self.config, self.capacity)
        window = self.spec.sliding_window
        ring = window if window is not None and window <= self.config.capacity else None
        self.slots = allocate_slots(
            config,
            self.spec.query_group,
            self.spec.sinks,
            batch,
            key_states,
            value_states,
            tracks,
            ring,
            values_in_keys=self.spec.latent is not None,
        )
        if self.policy.tracks_queries:
            if self.spec.rope is None:
                raise ValueError(f"{self.policy!r} needs each layer's RoPE: build the cache with make_cache(model)")
            self.rope = self.spec.rope.to(self.device)
            self.pairs = tuple(index.to(self.device) for index in pair_index(key_states.shape[-1], self.rope.rotary))
            if self.spec.statistics is not None:
                self.statistics = tuple(t.to(self.device) for t in self.spec.statistics)
            else:
                heads, dim = key_states.shape[1] * self.spec.query_group, key_states.shape[-1]
                moments = torch.zeros(batch, heads, dim + dim // 2 + 1, dtype=torch.float32, device=self.device)
                self.query_moments = static(moments)

    def grow(self, capacity: int) -> None:
        self.capacity = capacity
        if self.slots is not None:
            self.slots = self.slots.grown(capacity + self.spec.sinks)

    @property
    def sink_slot(self) -> int | None:
        """The slot that carries the attention sinks (the last one, never holding a token), if the layer has them."""
        return self.slots.sink_slot

    @property
    def staged_sink_slot(self) -> int | None:
        """The sink slot of a span's staged slots (the per-head view's last slot)."""
        return self.slots.view_capacity - 1 if self.spec.sinks else None

    @property
    def view(self) -> SlotStorage:
        """The slots of the rows the current forward feeds."""
        rows = self.shared.rows
        return self.slots if rows == slice(None) else self.slots.narrow(rows)

    @property
    def counters(self) -> RowCounters:
        rows, counters = self.shared.rows, self.shared.counters
        return counters if rows == slice(None) else counters.narrow(rows)

    @property
    def moments(self) -> Tensor:
        """The query moments of the rows the current forward feeds."""
        rows = self.shared.rows
        return self.query_moments if rows == slice(None) else self.query_moments[rows]

    def observe_queries(self, query: Tensor, positions: Tensor, weight: Tensor) -> None:
        """Add queries [B, Hq, L, D] at ``positions`` [B, L], each weighted by ``weight`` [B, L] (0: padding or a
        row not fed), to the running statistics (online TriAttention)."""
        if self.query_moments is None:
            return
        moments = self.moments
        moments[..., :-1].add_(unrotated_sums(query, positions, weight, self.rope, self.pairs))  # [B, Hq, D + F]
        moments[..., -1:].add_(weight.float().sum(dim=1)[:, None, None])

    def with_statistics(self, state: SlotState, moments: Tensor | None) -> SlotState:
        """``state`` with the query statistics and RoPE that policies tracking queries score with; ``moments``: the
        running sums of the rows ``state`` holds (all rows at compaction, the fed ones for a span)."""
        if not self.policy.tracks_queries:
            return state
        if self.statistics is not None:
            center, magnitude = (t[None].expand(state.keys.shape[0], -1, -1) for t in self.statistics)
        else:
            dim = state.keys.shape[-1]
            mean = moments[..., :-1] / moments[..., -1:].clamp(min=1.0)
            center, magnitude = mean[..., :dim].clone(), mean[..., dim:].clone()  # no aliasing into compiled regions
        return replace(state, query_center=center, query_magnitude=magnitude, rope=self.rope)

    @property
    def scaling(self) -> float:
        scaling = self.shared.scaling
        return scaling if scaling is not None else self.slots.keys.shape[-1] ** -0.5

    # -- transformers' layer protocol ---------------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        """A decoding step's tokens go into the slots, which attention then reads; a span's tokens are held for
        attention to stage (it knows their padding). ``kwargs`` is the dict the model also hands to the attention
        function: the layer puts itself there, so attention reads the slot state without globals."""
        if self.spec.latent is not None:  # MLA hands over (latent, rope key): store [latent, rope key] once
            key_states, value_states = torch.cat([key_states, value_states], dim=-1), key_states
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, length, _ = key_states.shape
        if not torch.compiler.is_compiling():
            self._check(key_states)
        positions = kwargs.get("position_ids")
        if positions is None:
            seen = self.counters.seen
            positions = seen[:, None] - length + torch.arange(length, device=seen.device)
        positions = positions.expand(batch, length)
        kwargs["position_ids"] = positions
        kwargs["rkv_layer"] = self
        if length > 1:  # a span (one token never needs staging: budget + 1 always fits)
            self.incoming = (key_states, value_states, positions)
            return key_states, value_states
        slots = self.view
        counters = self.counters
        slot = self._host_slot()
        if slot is not None:  # every row fed, in lockstep: one slot, written as a static cache writes
            slots.append(key_states, value_states, positions, None, slot)
        else:
            slots.append_rows(key_states, value_states, positions, slots.step_slot(counters), counters.fed)
        return slots.keys, slots.values

    def _host_slot(self) -> int | None:
        """An eager decoding step that feeds every row of the cache in lockstep (``model.generate``): the one slot
        all rows write, known on the host, so no per-row masked write is needed. None otherwise (traced steps,
        continuous batching)."""
        if torch.compiler.is_compiling() or not self.shared.lockstep_step:
            return None
        return self.slots.host_step_slot(self.shared.plan)

    def _check(self, key_states: Tensor) -> None:
        expected = (self.view.keys.shape[0], self.dtype, self.device)
        if (key_states.shape[0], key_states.dtype, key_states.device) != expected:
            raise ValueError(
                f"this cache holds batch {expected[0]} of {self.dtype} on {self.device}, got batch "
                f"{key_states.shape[0]} of {key_states.dtype} on {key_states.device}: use a fresh cache "
                "(rkv_flex.make_cache(model))"
            )

    # -- what attention calls -----------------------------------------------------------------------------------
    def observe_step(self, query: Tensor, positions: Tensor, scaling: float) -> None:
        """A decoding step's queries [B, Hq, 1, D]: keep them in the ring, accumulate attention if tracked."""
        self._learn_scaling(scaling)
        slots, counters = self.view, self.counters
        if self._host_slot() is not None:  # every row fed in lockstep: a plain copy into the ring
            slots.record_queries(query, self.shared.plan.seen_before[0] % self.config.window)
        else:
            slots.record_queries(query, (counters.seen - 1) % self.config.window, counters.fed)
        self.observe_queries(query, positions, counters.fed[:, None])
        if slots.attention_sum is not None:
            received = received_attention(
                query,
                slots.per_head(slots.keys),
                slots.allowed(),
                slots.per_head(slots.pos),
                positions,
                None,
                scaling,
                self.sliding_window,
                softcap=self.softcap,
                sinks=self.sinks,
            )
            slots.add_attention(received * counters.fed[:, None, None])

    def stage(self, query: Tensor, padding: Tensor | None, scaling: float, length: int) -> SlotState:
        """A span: each head's used slots followed by the new tokens (padded to ``length`` columns), with the new
        queries recorded and, if tracked, the attention they pay every slot accumulated."""
        self._learn_scaling(scaling)
        keys, values, positions = self.incoming
        self.incoming = None
        batch, _, count, _ = keys.shape
        new_valid = torch.ones(batch, count, dtype=torch.bool, device=keys.device) if padding is None else padding
        plan, slots, counters = self.shared.plan, self.view, self.counters
        kept = min(count, self.config.window)
        ring = (plan.seen_before[0] + count - kept) % self.config.window
        slots.record_queries(query, ring)
        self.observe_queries(query, positions, new_valid)
        if self.index == self.shared.first_attention:  # shared by all layers: the ring's validity, padding seen
            ring_slots = (ring + torch.arange(kept, device=keys.device)) % self.config.window
            counters.query_valid.index_copy_(1, ring_slots, new_valid[:, -kept:])
            if padding is not None and not self.shared.padded:
                self.shared.padded = not bool(padding.all())
        used = torch.full((batch,), plan.used_before[0], dtype=torch.long, device=keys.device)
        view = slots.heads(used)
        held = slots.occupancy(used)
        query_valid, softcap = counters.query_valid, self.softcap
        staged = view.staged(keys, values, positions, new_valid, length, held, query_valid, scaling, softcap)
        staged = self.with_statistics(staged, self.moments if self.query_moments is not None else None)
        if staged.attention_sum is not None:  # what the real (not padding) new queries pay every slot
            received = received_attention(
                query,
                staged.keys,
                staged.valid,
                staged.pos,
                positions,
                new_valid,
                scaling,
                self.sliding_window,
                softcap=self.softcap,
                sinks=self.sinks,
            )
            staged.attention_sum.add_(received)
            slots.add_view_attention(used, received)  # the used slots' share (a staged span repacks over it)
        return staged

    def keep_for_readers(self, span: StagedSpan) -> None:
        """KV-sharing layers attend what this layer's span attended (its slots before the span's compaction)."""
        if self.has_readers:
            self.last_span = span

    def commit(self, staged: SlotState) -> None:
        """After a span's attention: append its tokens, or keep ``budget`` of the staged slots."""
        self.view.commit_span(self.policy, self.config, staged, self.shared.plan)

    def choose_decode_kernel(self) -> None:
        """Compiled decoding steps use flex if it is right on this machine for this layer's shapes, else SDPA.
        Needs the slots and the model's scaling, soft-cap and sinks (learnt from the first forward)."""
        if not self.is_initialized:
            raise RuntimeError("choose the decoding kernels after the first forward (the prefill)")
        if self.spec.latent is not None:  # every query head reads one latent head: SDPA folds them into one matrix
            self.flex_decoding = False  # product and measured faster here (docs/method.md section 11)
            return
        slots = self.slots
        settings = dict(softcap=self.softcap, sinks=self.sinks, sink_slot=self.sink_slot, segments=slots.segments)
        self.flex_decoding = self.shared.kernels.decode_trusted(
            slots.queries[:, :, :1], slots.keys, slots.values, self.scaling, self.sliding_window, **settings
        )

    def dense_prefix(self) -> int | None:
        """When the used slots are exactly the valid ones of every head (one slot per head, rows in lockstep, no
        padding ever: then compaction never keeps filler), how many there are; otherwise None. Eager decoding then
        needs no mask."""
        plan = self.shared.plan
        if not self.slots.uniform or self.shared.padded or not plan.in_lockstep or plan.staged:
            return None
        return plan.used_after[0]

    def _learn_scaling(self, scaling: float) -> None:
        if self.shared.scaling is None and not torch.compiler.is_compiling():
            self.shared.scaling = scaling

    def learn_score_changes(self, softcap: float | None, sinks: Tensor | None) -> None:
        """Remember the model's soft-capping and sinks, so scores see the attention the model computes."""
        if torch.compiler.is_compiling():
            return
        if (sinks is not None) != self.spec.sinks:
            raise ValueError(
                f"layer {self.index} {'passes' if sinks is not None else 'does not pass'} attention sinks, but the "
                "cache was built for the other case: patch a supported architecture (rkv_flex.patch_model)"
            )
        self.softcap, self.sinks = softcap, sinks

    # -- compaction ---------------------------------------------------------------------------------------------
    def compact(self, rows: Tensor | None) -> None:
        """Keep ``budget`` of the used slots of ``rows`` (None: every row): the window's plus the policy's best,
        moved to the front in position order."""
        slots, counters = self.slots, self.shared.counters
        if not slots.selects:
            return
        used = counters.used.to(slots.keys.device)
        query_valid = counters.query_valid.to(used.device)
        state = slots.scoring_state(used, self.config.window, query_valid, self.scaling, self.softcap)
        state = self.with_statistics(state, self.query_moments)  # every row's, as the slots are
        fed = counters.fed
        if rows is not None:
            state = replace(state, **{name: t.index_select(0, rows) for name, t in _row_tensors(state).items()})
            fed = fed.index_select(0, rows)
        slots.keep_best(self.policy, self.config, state, rows, fed)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return int(self.shared.counters.seen.max()) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_length(self) -> int:
        return -1  # the logical length is unbounded; the slots are not

    def reset(self) -> None:
        if self.slots is not None:
            self.slots.reset()
        if self.query_moments is not None:
            self.query_moments.zero_()
        self.incoming = self.last_span = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.slots is not None:
            self.slots.reorder(beam_idx.to(self.device))
        if self.query_moments is not None:
            self.query_moments.copy_(self.query_moments.index_select(0, beam_idx.to(self.device)))

    def tensors(self) -> list[Tensor]:
        """Every tensor the layer keeps between forwards: its slots, and its query statistics if it has them."""
        kept = [] if self.slots is None else [t for t in self.slots.tensors().values() if t is not None]
        return kept + ([] if self.query_moments is None else [self.query_moments])

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V held (the slots, free ones included)."""
        return 0 if self.slots is None else self.slots.kv_bytes


@dataclass(frozen=True)
class StagedSpan:
    """A span's staged slots as its layer attended them: ``columns`` new-token columns (``length`` real ones, then
    padding for a fixed kernel shape); ``dense``: attended with the dense reference (``empty``: nothing before)."""

    slots: SlotState
    columns: int
    dense: bool
    empty: bool


class SharedKVLayer(CacheLayerMixin):
    """A KV-sharing layer's place in the cache: it holds nothing and selects nothing; its attention reads the source
    layer's kept set (that layer's slots, or in a span what that layer's span attended)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, source: RKVLayer):
        super().__init__()
        self.source = source
        source.has_readers = True
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        raise RuntimeError(f"this layer reads layer {self.source.index}'s keys and values; it never writes its own")

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.source.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx: Tensor) -> None:
        pass


class AttentionBesideState(StateLayer, CacheLayerMixin):
    """A layer that runs attention and a Mamba mixer side by side (Falcon-H1): transformers' model reads both from
    one cache layer, so this is the mixer's state layer and an attention layer whose keys and values go to its
    :class:`RKVLayer`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, attention: RKVLayer):
        CacheLayerMixin.__init__(self)
        StateLayer.__init__(self, attention.shared, attention.index)
        self.attention = attention
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        return self.attention.update(key_states, value_states, kwargs)

    def get_seq_length(self) -> int:
        return self.attention.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.attention.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.attention.get_max_length()

    def reset(self) -> None:
        super().reset()
        self.attention.reset()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        self.attention.reorder_cache(beam_idx)


def _with_capacity(config: RKVConfig, capacity: int) -> RKVConfig:
    """``config`` with slots for ``capacity`` tokens (a cache that never evicts, sized to the whole generation)."""
    return replace(config, buffer=capacity - config.budget)


def _row_tensors(state: SlotState) -> dict[str, Tensor]:
    """The state's tensors that have a row dimension."""
    names = ("keys", "values", "valid", "pos", "window", "queries", "query_valid", "attention_sum")
    names += ("query_center", "query_magnitude")
    return {name: getattr(state, name) for name in names if getattr(state, name) is not None}


def compact_layers(layers: list[RKVLayer], counters: RowCounters, budget: int, rows: Tensor | None) -> None:
    """Compact every layer back to ``budget`` slots for ``rows`` (None: all): one graph when compiled."""
    for layer in layers:
        layer.compact(rows)
    compacted = counters.used.masked_fill(counters.fed, budget)  # rows not fed keep their state
    if rows is None:
        counters.used.copy_(compacted)
    else:
        counters.used.index_copy_(0, rows, compacted.index_select(0, rows))


class RKVCache(Cache):
    """A transformers ``Cache`` of :class:`RKVLayer` slots, bounded by ``config.capacity`` per layer and row.

    ``compactor`` runs the compaction of all layers; the compiled loop swaps in a compiled one.
    """

    def __init__(
        self, config: RKVConfig, layers: list[LayerSpec | SharesKV | None], kernels: KernelChecks | None = None
    ):
        """``layers``: per model layer, its attention's spec, the layer whose keys it shares, or None for a layer
        with a constant-size state. ``policy="auto"`` is TriAttention when every attention layer's spec carries its
        RoPE (``make_cache`` reads it from the model), R-KV otherwise."""
        attention_specs = [spec for spec in layers if isinstance(spec, LayerSpec)]
        config = config.resolved(all(spec.rope is not None for spec in attention_specs))
        self.config = config
        self.policy = make_policy(config)
        self.shared = SharedState(kernels=kernels or KernelChecks(enabled=config.check_kernels))
        self.shared.first_attention = next(index for index, spec in enumerate(layers) if isinstance(spec, LayerSpec))
        built: list[CacheLayerMixin] = []
        for index, spec in enumerate(layers):
            if spec is None:
                built.append(StateLayer(self.shared, index))
            elif isinstance(spec, SharesKV):
                built.append(SharedKVLayer(built[spec.source]))
            elif spec.with_state:
                built.append(AttentionBesideState(RKVLayer(config, self.policy, spec, self.shared, index)))
            else:
                built.append(RKVLayer(config, self.policy, spec, self.shared, index))
        Cache.__init__(self, layers=built)  # by name: a subclass may put another cache class after this one
        self.attention: list[RKVLayer] = [
            layer.attention if isinstance(layer, AttentionBesideState) else layer
            for layer in self.layers
            if isinstance(layer, (RKVLayer, AttentionBesideState))
        ]
        self.sources: list[RKVLayer] = [layer for layer in self.attention if layer.has_readers]  # KV sharing
        self.states: list[StateLayer] = [layer for layer in self.layers if isinstance(layer, StateLayer)]
        self.planner: Planner | None = None
        self.compactor = compact_layers
        self._feeding: tuple[int, ...] | None = None  # the one row the current forwards feed (None: all)

    @property
    def evicts(self) -> bool:
        return self.policy.evicts

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, kwargs: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        kwargs = {} if kwargs is None else kwargs
        if layer_idx == self.shared.first_attention:
            self._start_forward(key_states)
        return self.layers[layer_idx].update(key_states, value_states, kwargs)

    def _start_forward(self, key_states: Tensor) -> None:
        """Layer 0 of every forward: a decoding step advances every fed row by one token on the device, traced or
        eager alike; a span's counters come from the host's plan. An eager forward plans itself unless its driver
        already did (:meth:`begin_step`); a traced one cannot, so its driver must have."""
        length = key_states.shape[2]
        if torch.compiler.is_compiling():
            if length != 1:
                raise RuntimeError(
                    f"a compiled forward of an RKVCache must feed one token per row, got {length}: feed prompts "
                    "and other multi-token spans eagerly (rkv_flex.generate and model.generate do)"
                )
        else:
            plan = self._take_plan(key_states)
            if length > 1:
                self._set_counters(plan)
                return
        self.attention[0].counters.advance_one()

    def _take_plan(self, key_states: Tensor) -> Plan:
        """The plan of the forward that starts now (made now unless its driver made it)."""
        batch, _, length, _ = key_states.shape
        if self.planner is None:
            self.prepare(batch, key_states.device)
        plan = self.planner.pending if self.planner.pending is not None else self._plan(length, self._feeding)
        self.planner.pending = None
        if plan.length != length:
            raise RuntimeError(f"a forward of {plan.length} tokens was planned but {length} arrived")
        if self.shared.rows == slice(None) and len(plan.rows) != self.planner.batch and length > 1:
            raise RuntimeError("a span planned for some rows must feed them alone (cache.feeding(rows))")
        self.shared.plan = plan
        shared = self.shared
        shared.lockstep_step = (
            length == 1
            and shared.rows == slice(None)
            and not shared.fed_on_device
            and len(plan.rows) == self.planner.batch
            and plan.in_lockstep
        )
        self._forget_spans()
        return plan

    def _forget_spans(self) -> None:
        """A new forward: the readers of the last span are done with it (free its staged slots)."""
        for layer in self.sources:
            layer.last_span = None

    def _set_counters(self, plan: Plan) -> None:
        """A span: the fed rows' slots used and tokens seen after it, as planned."""
        counters = self.attention[0].counters
        if plan.in_lockstep:
            counters.used.fill_(plan.used_after[0])
            counters.seen.fill_(plan.seen_before[0] + plan.length)
            return
        device = counters.used.device
        counters.used.copy_(torch.tensor(plan.used_after, device=device))
        counters.seen.copy_(torch.tensor([seen + plan.length for seen in plan.seen_before], device=device))

    def prepare(self, batch: int, device: torch.device) -> None:
        """Size the cache for ``batch`` rows (done by the first forward when nobody did it before)."""
        if self.planner is not None:
            raise RuntimeError("the cache is already prepared")
        self.planner = Planner(self.config, batch, self.capacity, self.evicts)
        self.shared.counters = RowCounters.allocate(batch, self.config.window, device)

    @contextlib.contextmanager
    def feeding(self, row: int) -> Iterator[None]:
        """Forwards inside feed only row ``row`` (their input has batch 1): continuous batching refills a row
        while the others keep their state."""
        self._feeding, self.shared.rows = (row,), slice(row, row + 1)
        try:
            yield
        finally:
            self._feeding, self.shared.rows = None, slice(None)

    def reset_rows(self, rows: list[int]) -> None:
        """Rows start empty (new prompts); the others keep their state."""
        self.planner.reset(rows)
        counters = self.shared.counters
        for row in rows:
            for tensor in (counters.used, counters.seen, counters.query_valid):
                tensor[row] = 0
            for layer in self.attention:
                if layer.slots is not None:
                    layer.slots.reset(slice(row, row + 1))
                if layer.query_moments is not None:
                    layer.query_moments[row] = 0
            for state in self.states:
                state.reset_rows(slice(row, row + 1))

    def _plan(self, length: int, rows: tuple[int, ...] | None = None) -> Plan:
        """Plan a forward and carry out what must happen before it: growth, compaction (every row at once when
        all are due, else one row at a time: one graph shape either way)."""
        plan = self.planner.plan(length, rows)
        if plan.grow_to is not None:
            for layer in self.attention:
                layer.grow(plan.grow_to)
        self._compact_rows(plan.compact)
        return plan

    def _compact_rows(self, rows: tuple[int, ...]) -> None:
        """Compact ``rows``: every row at once when all are due, else one row at a time (one graph shape either way)."""
        if len(rows) == self.planner.batch:
            self.compactor(self.attention, self.shared.counters, self.config.budget, None)
            return
        device, counters = self.shared.counters.used.device, self.shared.counters
        for row in rows:
            self.compactor(self.attention, counters, self.config.budget, torch.tensor([row], device=device))

    def begin_step(self, length: int = 1, rows: tuple[int, ...] | None = None) -> Plan:
        """Plan the next forward from outside it (compiled forwards cannot plan themselves); compacts now if due."""
        if self.planner is None:
            raise RuntimeError("the cache has seen no forward yet: prefill eagerly first")
        self.planner.pending = None  # a compiled step consumed the previous plan without telling the host
        plan = self._plan(length, rows)
        self.shared.plan = plan
        self._forget_spans()
        return plan

    def sync_rows(self, rows: list[int]) -> None:
        """The host counters of ``rows`` from the device: rows a decoding step did not feed (an engine's finished
        rows, which the host notices some steps later) stayed where they were."""
        counters = self.shared.counters
        used, seen = counters.used[rows].tolist(), counters.seen[rows].tolist()
        for row, row_used, row_seen in zip(rows, used, seen, strict=True):
            self.planner.used[row], self.planner.seen[row] = row_used, row_seen

    def step_ran(self) -> None:
        """A compiled step ran the planned forward (its traced code cannot tell the host)."""
        self.planner.pending = None

    def require_batch(self, batch: int) -> None:
        """Refuse, before any work, a forward of another batch size than the one this cache holds."""
        if self.planner is not None and self.planner.batch != batch:
            raise ValueError(
                f"this cache holds batch {self.planner.batch}, got batch {batch}: use a fresh cache "
                "(rkv_flex.make_cache(model))"
            )

    def cancel_plan(self) -> None:
        """Forget a planned step that never ran (a scheduler plans one step past the end of generation)."""
        if self.planner is not None:
            self.planner.cancel()

    @contextlib.contextmanager
    def unfed_rows_kept(self) -> Iterator[None]:
        """A decoding step inside keeps the state of the rows it does not feed (``counters.fed``): slots do by
        themselves; the constant-size states of a hybrid model's other layers are restored after it."""
        for state in self.states:
            state.save()
        yield
        for state in self.states:
            state.restore_unfed(self.shared.counters.fed)

    def choose_decode_kernels(self) -> None:
        """Before compiled decoding steps: check the flex decoding kernel of every layer's shape (once per shape)
        and use it where it is right, SDPA elsewhere.

        A hybrid model's compiled step decodes with SDPA: in torch 2.13, tracing flex's higher-order op before a
        linear-attention layer makes dynamo lose the writes that layer's kernel-hub wrapper (the ``kernels``
        package's context variable) makes, and the trace fails on a ``ContextVar.reset`` (docs/method.md, 8)."""
        for layer in self.attention:
            if self.states:
                layer.flex_decoding = False
            else:
                layer.choose_decode_kernel()

    def compact(self) -> None:
        """Compact every row that holds more than ``budget`` slots back to ``budget`` now; a row holding fewer
        keeps them as they are (nothing to choose, and no free slot may count as used)."""
        if self.planner is None:
            return
        rows = tuple(row for row, used in enumerate(self.planner.used) if used > self.config.budget)
        if not rows:
            return
        self._compact_rows(rows)
        for row in rows:
            self.planner.used[row] = self.config.budget
        self.planner.compactions += 1

    # -- what transformers asks of a Cache ----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen (the logical length transformers continues from), not slots used."""
        return 0 if self.planner is None else self.planner.seen[0]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0  # the rkv_flex mask function ignores offsets: the slot rule needs positions only

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.shared.counters is not None:
            self.shared.counters.reorder(beam_idx.to(self.shared.counters.used.device))
            self.planner.reorder(beam_idx.tolist())

    def reset(self) -> None:
        super().reset()
        if self.shared.counters is not None:
            for tensor in (self.shared.counters.used, self.shared.counters.seen, self.shared.counters.query_valid):
                tensor.zero_()
            self.planner.reset()
        self.shared.plan = None
        self.shared.padded = False

    @property
    def compactions(self) -> int:
        return 0 if self.planner is None else self.planner.compactions

    @property
    def capacity(self) -> int:
        """Slots per layer, row and KV head."""
        return self.attention[0].capacity

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V held by all attention layers."""
        return sum(layer.kv_bytes for layer in self.attention)

    @property
    def state_bytes(self) -> int:
        """Bytes of the constant-size states (linear attention, Mamba, convolutions) of a hybrid model."""
        return sum(state.state_bytes for state in self.states)
