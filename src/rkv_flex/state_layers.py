"""Layers whose state does not grow with the sequence (linear attention, Mamba, short convolutions): transformers'
own cache layer for them, with rows.

Their state is constant-size already, so there is nothing to compress. What rkv_flex adds is what its drivers need:
the state is allocated for every row of the cache even when the first forward feeds one row, a forward that feeds
some rows (continuous batching refills a row alone) sees only theirs, and a refilled row starts from zeros, which
is exactly transformers' state before a prompt (the causal convolution pads with zeros, the recurrence starts at
zero).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers.cache_utils import LinearAttentionLayer

if TYPE_CHECKING:
    from .cache import SharedState


def rows_of(states: dict[int, Tensor | None], rows: slice) -> dict[int, Tensor | None]:
    """The states of some rows: views, so in-place writes (all transformers does to them) land in every row's."""
    if rows == slice(None):
        return states
    return {index: None if tensor is None else tensor[rows] for index, tensor in states.items()}


class StateLayer(LinearAttentionLayer):
    """A constant-size state layer of an :class:`~rkv_flex.cache.RKVCache`: transformers' ``LinearAttentionLayer``
    holding every row's state, of which a forward sees the rows it feeds."""

    def __init__(self, shared: SharedState, index: int):
        self.shared, self.index = shared, index
        self._full: dict[str, dict[int, Tensor | None]] = {"conv": {}, "recurrent": {}}
        self._saved: list[tuple[Tensor, Tensor]] = []  # (state, its copy before the current decoding step)
        super().__init__()

    # transformers' layer reads and writes these two dicts: they are views of the fed rows
    @property
    def conv_states(self) -> dict[int, Tensor | None]:
        return rows_of(self._full["conv"], self.shared.rows)

    @conv_states.setter
    def conv_states(self, value: dict) -> None:
        self._full["conv"] = dict(value)

    @property
    def recurrent_states(self) -> dict[int, Tensor | None]:
        return rows_of(self._full["recurrent"], self.shared.rows)

    @recurrent_states.setter
    def recurrent_states(self, value: dict) -> None:
        self._full["recurrent"] = dict(value)

    def _rows(self, like: Tensor) -> int:
        """Rows to allocate: every row of the cache, also when the first forward feeds one."""
        counters = self.shared.counters
        return like.shape[0] if counters is None else counters.used.shape[0]

    def lazy_initialization(
        self,
        conv_states: Tensor | None = None,
        recurrent_states: Tensor | list[Tensor] | None = None,
        state_idx: int = 0,
        conv_kernel_size: int | None = None,
    ) -> None:
        if conv_states is not None:
            kernel = conv_states.shape[-1] if conv_kernel_size is None else conv_kernel_size
            self.dtype, self.device = conv_states.dtype, conv_states.device
            self.cumulative_length_linear = self.cumulative_length_linear.to(self.device)
            shape = (self._rows(conv_states), *conv_states.shape[1:-1], kernel)
            self._full["conv"][state_idx] = self._allocate(shape, conv_states.dtype, self.device)
            self.conv_kernel_size[state_idx] = kernel
            self.is_conv_states_initialized[state_idx] = True
        if recurrent_states is not None:
            like = recurrent_states if isinstance(recurrent_states, Tensor) else recurrent_states[0]
            shape = (self._rows(like), *like.shape[1:])
            self._full["recurrent"][state_idx] = self._allocate(shape, like.dtype, like.device)
            self.is_recurrent_states_initialized[state_idx] = True

    def _allocate(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        state = _static(torch.zeros(shape, dtype=dtype, device=device))
        self._saved.append((state, _static(torch.zeros_like(state))))
        return state

    def tensors(self) -> list[Tensor]:
        """Every row's state, and the token count transformers keeps beside it."""
        return [state for state, _ in self._saved] + [self.cumulative_length_linear]

    def save(self) -> None:
        """Before a decoding step: remember every row's state."""
        for state, saved in self._saved:
            saved.copy_(state)

    def restore_unfed(self, fed: Tensor) -> None:
        """After a decoding step: rows it did not feed (an engine's finished or idle rows) get their state back,
        since transformers' layers advance every row (a [B] bool ``fed``)."""
        for state, saved in self._saved:
            state.copy_(torch.where(fed.view(-1, *(1,) * (state.dim() - 1)), state, saved))

    def reset_rows(self, rows: slice) -> None:
        for states in self._full.values():
            for tensor in states.values():
                if tensor is not None:
                    tensor[rows] = 0

    def reset(self) -> None:
        self.reset_rows(slice(None))
        self.cumulative_length_linear.zero_()
        for index in range(self.number_of_states):
            self.has_previous_state[index] = False

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for states in self._full.values():
            for tensor in states.values():
                if tensor is not None:
                    tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None):
        raise NotImplementedError("rkv_flex's state layers do not record past states (assisted decoding)")

    @property
    def state_bytes(self) -> int:
        return sum(t.nbytes for states in self._full.values() for t in states.values() if t is not None)


def _static(tensor: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor
