"""torch.compile as the library uses it: whole graphs of static shapes, and a clear error instead of a fallback.

dynamo compiles one graph per distinct input shape (batch size, slot capacity, dtype, device, prompt-chunk bucket,
model shape) and keeps at most ``torch._dynamo.config.recompile_limit`` of them per function. With
``fullgraph=True`` it then fails; :func:`compiled` turns that failure into an error that says what to change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit


class GraphLimitError(RuntimeError):
    """A compiled function was asked for more graphs than dynamo keeps."""


def compiled(function: Callable, mode: str | None = None) -> Callable:
    """``torch.compile(function, fullgraph=True, dynamic=False, mode=mode)`` that raises :class:`GraphLimitError`
    when one more graph would exceed dynamo's recompile limit."""
    graph = torch.compile(function, fullgraph=True, dynamic=False, mode=mode)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return graph(*args, **kwargs)
        except FailOnRecompileLimitHit as error:
            limit = torch._dynamo.config.recompile_limit
            raise GraphLimitError(
                f"{function.__qualname__} already holds {limit} compiled graphs in this process (dynamo's "
                "recompile_limit), one per distinct shape: batch size, slot capacity, dtype, device, prompt-chunk "
                "length bucket, model. Reuse one rkv_flex.Engine per batch size and keep prefill_chunk fixed, "
                "or raise torch._dynamo.config.recompile_limit if you need more shapes in one process."
            ) from error

    call.graph = graph
    return call
