"""torch.compile as the library uses it: whole graphs of static shapes, owned by whoever needs them, and a clear
error instead of a fallback.

dynamo keeps the graphs of a function on its code object, at most ``torch._dynamo.config.recompile_limit`` (8) of
them, one per distinct set of input shapes. A module-level compiled function is therefore shared by every model,
budget and batch size in the process, and a few of them exhaust it. Instead, every compiled function here is a
private copy of the function (its own code object) made for one key: a :class:`GraphStore`, owned by a patched
model, holds one copy per (function, shapes) key, so each copy needs one graph, and unpatching (or deleting) the
model frees them all.
"""

from __future__ import annotations

import functools
import gc
import types
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch._dynamo.utils import counters

BACKEND = "inductor"  # tests of graph bookkeeping alone may swap in "eager" (dynamo still traces and counts graphs)


class GraphLimitError(RuntimeError):
    """A compiled function was asked for more graphs than dynamo keeps."""


def private_copy(function: Callable) -> Callable:
    """``function`` with a code object of its own: dynamo's graphs (and its recompile limit) then belong to the
    copy, and are freed with it."""
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(copy, function)


def compiled(function: Callable, mode: str | None = None) -> Callable:
    """``torch.compile(function, fullgraph=True, dynamic=False, mode=mode)`` over a private copy of ``function``,
    raising :class:`GraphLimitError` when one more graph would exceed dynamo's recompile limit."""
    backend = BACKEND if mode is None else "inductor"
    graph = torch.compile(private_copy(function), fullgraph=True, dynamic=False, mode=mode, backend=backend)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        graphs = counters["stats"]["unique_graphs"]
        try:
            result = graph(*args, **kwargs)
            if counters["stats"]["unique_graphs"] != graphs:
                # tracing leaves reference cycles that hold the inputs (a cache, its tensors) until the garbage
                # collector runs: collect them now, so an owner that lets go of its cache frees it at once
                gc.collect()
            return result
        except FailOnRecompileLimitHit as error:
            limit = torch._dynamo.config.recompile_limit
            raise GraphLimitError(
                f"{function.__qualname__} was compiled {limit} times for one key (dynamo's recompile_limit): its "
                "inputs changed in a way the key does not name; please report this with the shapes you used"
            ) from error

    call.graph = graph
    return call


class GraphStore:
    """Compiled functions of one owner (a patched model): one private copy per (function, key), where the key names
    everything that gives the function another graph (batch size, slot capacity, dtype, device, lengths)."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, Callable] = {}

    def get(self, function: Callable, key: Hashable, mode: str | None = None) -> Callable:
        """The compiled copy of ``function`` for ``key`` (made on first use)."""
        name = (function.__module__, function.__qualname__, key, mode)
        if name not in self._graphs:
            self._graphs[name] = compiled(function, mode)
        return self._graphs[name]

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every compiled copy (and with them their graphs)."""
        self._graphs.clear()
