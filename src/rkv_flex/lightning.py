"""MiniMax-Text-01's lightning attention: the cache class its model requires.

MiniMax's model refuses any cache that is not a ``MiniMaxCache`` and keeps each lightning layer's [B, H, D, D]
key-value sum through two methods of its own. :class:`LightningCache` is an :class:`~rkv_flex.cache.RKVCache` of
that class: its softmax-attention layers are slots as for any model, and each lightning layer's sum is a
:class:`~rkv_flex.state_layers.StateLayer`'s recurrent state, held for every row like any hybrid's.

The model reads a prompt in blocks when the layer has no sum yet and token by token when it has one. A row the
engine refills starts from no sum, so its prompt takes the block path, as it would alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from .cache import RKVCache


class LightningCache(RKVCache, MiniMaxCache):
    """An :class:`RKVCache` that MiniMax's model accepts."""

    # MiniMaxCache keeps its sums in a list of its own; these read the layers, as RKVCache does
    __len__ = Cache.__len__
    batch_repeat_interleave = Cache.batch_repeat_interleave
    batch_select_indices = Cache.batch_select_indices

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fresh: dict[int, set[int]] = {state.index: set() for state in self.states}  # rows without a sum yet

    def get_linear_cache(self, layer_idx: int) -> Tensor | None:
        """The fed rows' sums, or None before the first forward and for a refilled row's first forward."""
        layer = self.layers[layer_idx]
        if not layer.has_previous_state[0]:
            return None
        if self._feeding is not None and set(self._feeding) <= self.fresh[layer_idx]:
            return None
        return layer.recurrent_states[0]

    def set_linear_cache(self, layer_idx: int, linear_cache: Tensor) -> None:
        layer = self.layers[layer_idx]
        layer.update_recurrent_state(linear_cache, 0)
        layer.has_previous_state[0] = True
        if self._feeding is not None:
            self.fresh[layer_idx].difference_update(self._feeding)

    def reset_rows(self, rows: list[int]) -> None:
        super().reset_rows(rows)
        for fresh in self.fresh.values():
            fresh.update(rows)
