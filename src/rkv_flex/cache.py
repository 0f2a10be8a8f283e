"""The slot cache: a transformers ``Cache`` whose layers hold a fixed number of KV slots.

Each layer allocates ``capacity = budget + buffer`` slots of K and V once, with the absolute position and the
validity of every slot, and the last ``window`` post-RoPE queries. Appending writes in place at the next free
slot; compaction gathers the kept slots (in position order) to the front, in place. Shapes never change, so the
decode step and the compaction step each compile to one static graph.

The container decides, on the host and from plain counters (no device sync), what each forward does:

* append: the new tokens fit in the free slots;
* compact, then append: the slots are full (decoding) -- every ``buffer`` steps;
* stage: the new tokens do not fit even after a compaction (a long prompt). Attention then runs over the used
  slots plus all new tokens, and the layer keeps ``budget`` of them as soon as it has seen their queries.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import RKVConfig
from .masks import decode_block_mask, decode_block_tables, dense_slot_mask, window_mask
from .policies import SlotState, make_policy
from .scoring import select_keep


def _static(tensor: Tensor) -> Tensor:
    """Mark a persistent buffer as having a fixed address (what CUDA graphs need); a no-op elsewhere."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


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


class RKVLayer(CacheLayerMixin):
    """One decoder layer's slots. ``keys``/``values`` [B, Hkv, C, D]; ``valid``/``pos`` [B, Hkv, C]."""

    is_compileable = True
    is_sliding = False

    def __init__(self, config: RKVConfig, num_query_heads: int, policy: Any, sliding_window: int | None = None):
        super().__init__()
        self.config = config
        self.num_query_heads = num_query_heads
        self.policy = policy
        self.selection_region = selection_region(policy, config.budget) if getattr(policy, "evicts", True) else None
        self.sliding_window = sliding_window
        self.capacity = config.capacity
        self.staged: SlotState | None = None  # the used slots + new tokens of a forward that does not fit
        self.block_tables: tuple[Tensor, ...] | None = None  # where flex decoding looks (attention="flex")
        self.block_mask = None  # the flex decoding mask over these slots, for eager calls

    # -- allocation -------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self._allocate(batch, kv_heads, head_dim, key_states.dtype, key_states.device, self.capacity)

    def _allocate(self, batch: int, kv_heads: int, head_dim: int, dtype, device, capacity: int) -> None:
        self.capacity = capacity
        self.dtype, self.device = dtype, device
        slots = (batch, kv_heads, capacity)
        window = self.config.window
        self.keys = _static(torch.zeros(*slots, head_dim, dtype=dtype, device=device))
        self.values = _static(torch.zeros(*slots, head_dim, dtype=dtype, device=device))
        self.valid = _static(torch.zeros(slots, dtype=torch.bool, device=device))
        self.pos = _static(torch.zeros(slots, dtype=torch.long, device=device))
        self.n_used = _static(torch.zeros((), dtype=torch.long, device=device))
        self.n_seen = _static(torch.zeros((), dtype=torch.long, device=device))
        self.queries = _static(torch.zeros(batch, self.num_query_heads, window, head_dim, dtype=dtype, device=device))
        self.query_valid = _static(torch.zeros(batch, window, dtype=torch.bool, device=device))
        self.query_pos = _static(torch.zeros(batch, 1, dtype=torch.long, device=device))
        tracks = getattr(self.policy, "tracks_attention", False)
        self.attention_sum = _static(torch.zeros(slots, dtype=torch.float32, device=device)) if tracks else None
        self.block_tables = self.block_mask = None
        if self.config.attention == "flex":
            self.block_tables = tuple(_static(t) for t in decode_block_tables(batch, capacity, device))
            group = self.num_query_heads // kv_heads
            self.block_mask = decode_block_mask(
                self.block_tables, self.valid, self.pos, self.query_pos, group, self.sliding_window
            )
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        """Reallocate with more slots, keeping the content (for policies that never evict)."""
        slot_tensors = ("keys", "values", "valid", "pos", "attention_sum")
        old = {name: getattr(self, name) for name in slot_tensors}
        kept = {name: getattr(self, name).clone() for name in ("n_used", "n_seen", "queries", "query_valid")}
        batch, kv_heads, used, head_dim = self.keys.shape
        self._allocate(batch, kv_heads, head_dim, self.dtype, self.device, capacity)
        for name, tensor in old.items():
            if tensor is not None:
                getattr(self, name)[:, :, :used].copy_(tensor)
        for name, tensor in kept.items():
            getattr(self, name).copy_(tensor)

    # -- transformers' layer protocol ---------------------------------------------------------------------------
    def update(
        self, key_states: Tensor, value_states: Tensor, kwargs: dict | None = None, staged_from: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store the new tokens; return the keys/values attention must use (the slots, or the staged view).

        ``kwargs`` is the dict the model also hands to the attention function: the layer puts itself there and
        makes sure ``position_ids`` is present, so attention reads the slot state without globals.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, kv_heads, length, _ = key_states.shape
        if (batch, key_states.dtype, key_states.device) != (self.keys.shape[0], self.dtype, self.device):
            raise ValueError(
                f"this cache holds batch {self.keys.shape[0]} of {self.dtype} on {self.device}, got batch {batch} of "
                f"{key_states.dtype} on {key_states.device}: use a fresh cache (rkv_flex.make_cache(model))"
            )
        kwargs = {} if kwargs is None else kwargs
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (self.n_seen + torch.arange(length, device=self.device))[None]
        positions = positions.expand(batch, length)
        kwargs["position_ids"] = positions
        kwargs["rkv_layer"] = self
        new_pos = positions[:, None, :].expand(batch, kv_heads, length)
        self.n_seen.add_(length)
        if staged_from is not None:
            return self._stage(key_states, value_states, new_pos, staged_from)
        slots = self.n_used + torch.arange(length, device=self.device)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.valid.index_fill_(2, slots, True)
        self.pos.index_copy_(2, slots, new_pos)
        if self.attention_sum is not None:
            self.attention_sum.index_fill_(2, slots, 0.0)
        self.query_pos.copy_(positions[:, -1:])
        self.n_used.add_(length)
        return self.keys, self.values

    def _stage(self, key_states: Tensor, value_states: Tensor, new_pos: Tensor, used: int) -> tuple[Tensor, Tensor]:
        def joined(slot_tensor: Tensor, new: Tensor) -> Tensor:
            return torch.cat([slot_tensor[:, :, :used], new], dim=2)

        slots = used + key_states.shape[2]
        attention_sum = None
        if self.attention_sum is not None:
            attention_sum = joined(self.attention_sum, torch.zeros(new_pos.shape, device=self.device))
        self.staged = SlotState(
            keys=joined(self.keys, key_states),
            values=joined(self.values, value_states),
            valid=joined(self.valid, torch.ones(new_pos.shape, dtype=torch.bool, device=self.device)),
            pos=joined(self.pos, new_pos),
            window=window_mask(slots, slots, self.config.window, self.device),
            queries=self.queries,
            query_valid=self.query_valid,
            attention_sum=attention_sum,
        )
        return self.staged.keys, self.staged.values

    def observe(
        self, query: Tensor, query_pos: Tensor, new_valid: Tensor | None, scaling: float
    ) -> tuple[Tensor, Tensor]:
        """Called by attention with this forward's queries [B, Hq, L, D], their positions [B, L] and the new
        tokens' padding [B, L] (None: no padding).

        Marks padding, records the newest queries, accumulates attention if the policy tracks it and, for a staged
        forward, keeps ``budget`` slots. Returns ``(valid, pos)`` of the keys attention runs over.
        """
        view = self.staged
        valid, pos = (self.valid, self.pos) if view is None else (view.valid, view.pos)
        if new_valid is not None:
            self._mark_padding(valid, new_valid)
        self._record_queries(query, new_valid)
        if self.attention_sum is not None:
            keys = self.keys if view is None else view.keys
            attention_sum = self.attention_sum if view is None else view.attention_sum
            allowed = dense_slot_mask(valid, pos, query_pos, self.sliding_window)
            attention_sum += received_attention(query, keys, allowed, new_valid, scaling)
        if view is not None:
            self.staged = None
            self._keep_best(view)
        return valid, pos

    def _mark_padding(self, valid: Tensor, new_valid: Tensor) -> None:
        length = new_valid.shape[1]
        if self.staged is not None:
            valid[:, :, -length:] &= new_valid[:, None, :]
            return
        slots = self.n_used - length + torch.arange(length, device=self.device)
        valid.index_copy_(2, slots, valid.index_select(2, slots) & new_valid[:, None, :])

    def _record_queries(self, query: Tensor, new_valid: Tensor | None) -> None:
        window = self.config.window
        kept = min(query.shape[2], window)
        ring = (self.n_seen - kept + torch.arange(kept, device=self.device)) % window
        self.queries.index_copy_(2, ring, query[:, :, -kept:])
        if new_valid is None:
            self.query_valid.index_fill_(1, ring, True)
        else:
            self.query_valid.index_copy_(1, ring, new_valid[:, -kept:])

    # -- compaction ---------------------------------------------------------------------------------------------
    def compact(self) -> None:
        """Keep ``budget`` of the used slots: the window's plus the policy's best, moved to the front in order."""
        self._keep_best(
            SlotState(
                keys=self.keys,
                values=self.values,
                valid=self.valid,
                pos=self.pos,
                window=window_mask(self.n_used, self.capacity, self.config.window, self.device),
                queries=self.queries,
                query_valid=self.query_valid,
                attention_sum=self.attention_sum,
            )
        )

    def _keep_best(self, state: SlotState) -> None:
        budget = self.config.budget
        if torch.compiler.is_compiling():
            keep = self.selection_region(*astuple_shallow(state))
        else:
            scores = self.policy(state)
            check_scores(scores, state.valid)
            keep = select_keep(scores, state.valid, state.window, budget)
        per_dim = keep[..., None].expand(-1, -1, -1, state.keys.shape[-1])
        self.keys[:, :, :budget].copy_(state.keys.gather(2, per_dim))
        self.values[:, :, :budget].copy_(state.values.gather(2, per_dim))
        self.valid[:, :, :budget].copy_(state.valid.gather(2, keep))
        self.valid[:, :, budget:] = False
        self.pos[:, :, :budget].copy_(state.pos.gather(2, keep))
        if self.attention_sum is not None:
            self.attention_sum[:, :, :budget].copy_(state.attention_sum.gather(2, keep))
        self.n_used.fill_(budget)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return int(self.n_seen) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_length(self) -> int:
        return -1  # the logical length is unbounded; the slots are not

    def reset(self) -> None:
        if not self.is_initialized:
            return
        for tensor in (self.keys, self.values, self.valid, self.pos, self.n_used, self.n_seen, self.query_valid):
            tensor.zero_()
        if self.attention_sum is not None:
            self.attention_sum.zero_()
        self.staged = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row ``i`` takes the state of row ``beam_idx[i]``."""
        beam_idx = beam_idx.to(self.device)
        for name in ("keys", "values", "valid", "pos", "queries", "query_valid", "query_pos", "attention_sum"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx))

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V held (the slots, free ones included)."""
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0


def astuple_shallow(state: SlotState) -> tuple:
    return tuple(getattr(state, field.name) for field in dataclasses.fields(state))


def selection_region(policy: Any, budget: int):
    """The kept-slot choice of one layer as a region compiled once and reused by every layer of a traced
    compaction (instead of one copy of the scoring kernels per layer)."""
    try:
        return _cached_selection_region(policy, budget)
    except TypeError:  # an unhashable user scorer: its own region
        return _cached_selection_region.__wrapped__(policy, budget)


@functools.cache
def _cached_selection_region(policy: Any, budget: int):
    @torch.compiler.nested_compile_region
    def select(*fields: Any) -> Tensor:
        state = SlotState(*fields)
        return select_keep(policy(state), state.valid, state.window, budget)

    return select


def received_attention(query: Tensor, keys: Tensor, allowed: Tensor, query_valid: Tensor | None, scaling: float):
    """Attention each key receives [B, Hkv, S] from the queries [B, Hq, L, D], summed over queries and group."""
    group = query.shape[1] // keys.shape[1]
    batch, kv_heads = keys.shape[:2]
    q = query.float().reshape(batch, kv_heads, group * query.shape[2], -1)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling
    logits = logits.reshape(batch, kv_heads, group, query.shape[2], -1)
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if query_valid is not None:
        probs = probs * query_valid[:, None, None, :, None]
    return probs.sum(dim=(2, 3))


def sliding_windows(text_config: Any) -> list[int | None]:
    """Per layer, the sliding-window size transformers applies (None: full attention)."""
    layers, window = text_config.num_hidden_layers, getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    if window is None or types is None:
        return [window] * layers
    return [window if kind == "sliding_attention" else None for kind in types]


def compact_layers(layers: list[RKVLayer]) -> None:
    """Compact every layer (one graph when compiled)."""
    for layer in layers:
        layer.compact()


class RKVCache(Cache):
    """A transformers ``Cache`` of :class:`RKVLayer` slots, bounded by ``config.capacity`` per layer.

    Host-side counters (``tokens_seen``, ``slots_used``) decide each step without reading the device.
    ``compactor`` runs the compaction of all layers; the compiled decoder swaps in a compiled one.
    """

    def __init__(
        self,
        config: RKVConfig,
        num_layers: int,
        num_query_heads: int,
        sliding_windows: list[int | None] | None = None,
    ):
        self.config = config
        self.policy = make_policy(config)
        windows = sliding_windows or [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"sliding_windows has {len(windows)} entries for {num_layers} layers")
        super().__init__(layers=[RKVLayer(config, num_query_heads, self.policy, window) for window in windows])
        self.tokens_seen = 0
        self.slots_used = 0
        self.compactions = 0
        self.compactor = compact_layers
        self._staged_from: int | None = None
        self._planned: int | None = None  # a forward already planned by a driver (compiled loops plan from outside)

    @classmethod
    def for_model(cls, model_config: Any, config: RKVConfig) -> RKVCache:
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        return cls(config, text.num_hidden_layers, text.num_attention_heads, sliding_windows(text))

    @property
    def evicts(self) -> bool:
        return getattr(self.policy, "evicts", True)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, kwargs: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        if layer_idx == 0 and not torch.compiler.is_compiling():
            length = key_states.shape[2]
            if self._planned is None:
                self.begin_step(length)
            elif self._planned != length:
                raise RuntimeError(f"a forward of {self._planned} tokens was planned but {length} arrived")
            self._planned = None
        return self.layers[layer_idx].update(key_states, value_states, kwargs, self._staged_from)

    def begin_step(self, length: int) -> None:
        """Plan a forward of ``length`` new tokens: make room (compacting if full), or stage them.

        Eager forwards plan themselves; a compiled forward cannot (its host logic is traced away), so its driver
        calls this first.
        """
        config, used = self.config, self.slots_used
        self._planned = length
        first = self.tokens_seen == 0
        self._staged_from = None
        if not self.evicts:
            self._ensure_capacity(used + length)
        elif first and config.compact_prompt and length > config.budget:
            self._staged_from = used
        elif used + length > config.capacity:
            if first:
                raise ValueError(
                    f"a prompt of {length} tokens does not fit the {config.capacity} slots "
                    "(budget + buffer) and RKVConfig.compact_prompt is False"
                )
            if config.budget + length <= config.capacity:
                self.compact()
                used = config.budget
            else:
                self._staged_from = used
        self.slots_used = config.budget if self._staged_from is not None else used + length
        self.tokens_seen += length

    def cancel_plan(self) -> None:
        """Forget a planned forward that never ran (a scheduler plans one step past the end of generation)."""
        if self._planned is not None:
            self.tokens_seen -= self._planned
            self.slots_used -= self._planned
            self._planned = None

    def compact(self) -> None:
        """Compact every layer back to ``budget`` slots now."""
        self.compactor(self.layers)
        self.slots_used = self.config.budget
        self.compactions += 1

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self.layers[0].capacity
        if needed <= capacity:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError("the slot cache cannot grow inside a compiled region")
        capacity = max(needed, 2 * capacity)
        for layer in self.layers:
            if layer.is_initialized:
                layer.grow(capacity)
            else:
                layer.capacity = capacity

    # -- what transformers asks of a Cache ----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    def get_query_offset(self, layer_idx: int = 0) -> Tensor | int:
        # A tensor, like StaticCache: transformers asks for it inside the compiled decode step, where reading the
        # host counter would specialise the graph on it.
        layer = self.layers[layer_idx]
        return layer.n_seen if layer.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.tokens_seen = self.slots_used = self.compactions = 0
        self._planned = self._staged_from = None

    @property
    def capacity(self) -> int:
        """Slots per layer, per sequence and KV head."""
        return self.layers[0].capacity

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V held by all layers."""
        return sum(layer.kv_bytes for layer in self.layers)
