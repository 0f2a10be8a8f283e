"""Where the plugin meets vLLM 0.32: its scheduler, its CPU model runner and its CPU attention, patched in place
(no vLLM file is edited) by :func:`install`. Every hook is a no-op for an engine that did not ask for the plugin."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .pages import PageLayout
from .scheduler_side import SchedulerSide
from .settings import SUPPORTED_VLLM, engine_settings
from .worker_side import WorkerSide

_installed = False
_stepping: WorkerSide | None = None  # the worker side whose step is running in this process (None: stock)


def install() -> None:
    """Patch vLLM's classes once per process (vLLM loads general plugins in each of its processes)."""
    global _installed
    if _installed:
        return
    _installed = True
    import vllm
    from vllm.config import VllmConfig

    _wrap(VllmConfig, "__post_init__", _checked_config)
    if vllm.__version__ != SUPPORTED_VLLM:
        return  # nothing else is patched; an engine that asks for the plugin is refused by _checked_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    _wrap(Scheduler, "__init__", _scheduler_init)
    _wrap(Scheduler, "schedule", _schedule)
    _wrap(Scheduler, "_preempt_request", _preempt_request)
    _wrap(CPUModelRunner, "_update_states", _update_states)
    _wrap(CPUModelRunner, "_prepare_inputs", _prepare_inputs)
    _wrap(CPUAttentionBackendImpl, "forward", _attention_forward)


def _wrap(owner: type, name: str, hook: Any) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        return hook(original, self, *args, **kwargs)

    setattr(owner, name, hooked)


def _checked_config(original: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """An engine's configuration, refused as it is made (before any model is loaded) if it asks for the plugin
    and the plugin cannot serve it."""
    original(self, *args, **kwargs)
    engine_settings(self)


# -- scheduler ----------------------------------------------------------------------------------------------------
def _scheduler_init(original: Any, self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
    settings = engine_settings(vllm_config)
    original(self, vllm_config, *args, **kwargs)
    self._rkv_flex = None if settings is None else SchedulerSide(self, settings)


def _schedule(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    output = original(self, *args, **kwargs)
    if getattr(self, "_rkv_flex", None) is not None:
        self._rkv_flex.scheduled(output)
    return output


def _preempt_request(original: Any, self: Any, request: Any, *args: Any, **kwargs: Any) -> None:
    original(self, request, *args, **kwargs)
    if getattr(self, "_rkv_flex", None) is not None:
        self._rkv_flex.preempted(request.request_id)


# -- worker -------------------------------------------------------------------------------------------------------
def _worker_side(runner: Any) -> WorkerSide | None:
    if not hasattr(runner, "_rkv_flex"):
        settings = engine_settings(runner.vllm_config)
        runner._rkv_flex = None if settings is None else WorkerSide(runner, settings, probe_layout)
    return runner._rkv_flex


def _update_states(original: Any, self: Any, scheduler_output: Any) -> Any:
    side = _worker_side(self)
    if side is not None:
        side.update(scheduler_output)
    return original(self, scheduler_output)


def _prepare_inputs(original: Any, self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any) -> Any:
    global _stepping
    side = _stepping = _worker_side(self)
    if side is None:
        return original(self, scheduler_output, num_scheduled_tokens, *args)
    steps = side.before_inputs(num_scheduled_tokens)
    inputs = original(self, scheduler_output, num_scheduled_tokens, *args)
    side.after_inputs(steps, num_scheduled_tokens)
    return inputs


def _attention_forward(original: Any, self: Any, layer: Any, query: Any, key: Any, value: Any, *args: Any, **kw: Any):
    metadata = args[1] if len(args) > 1 else kw.get("attn_metadata")
    if _stepping is not None and metadata is not None:
        _stepping.observe(layer.layer_name, query[: metadata.num_actual_tokens], metadata.query_start_loc)
    return original(self, layer, query, key, value, *args, **kw)


def probe_layout(isa: str, dtype: torch.dtype, block_size: int, dim: int) -> PageLayout:
    """Where vLLM's own cache write puts each token's key and value channels in a (block, KV head) slab."""
    from vllm import _custom_ops as ops

    offsets = {1: torch.empty(block_size, dim, dtype=torch.long), -1: torch.empty(block_size, dim, dtype=torch.long)}
    cache = torch.zeros(1, 1, block_size, 2 * dim, dtype=dtype)
    key_cache, value_cache = cache.view(1, 1, 2 * block_size, dim).chunk(2, dim=2)
    channel = torch.arange(1, dim + 1, dtype=torch.float32).view(1, 1, dim)
    for token in range(block_size):
        cache.zero_()
        ops.cpu_attn_reshape_and_cache(
            channel.to(dtype), (-channel).to(dtype), key_cache, value_cache, torch.tensor([token]), isa
        )
        written = cache.view(-1).float()
        for sign, into in offsets.items():
            where = (written * sign > 0).nonzero().squeeze(1)
            if where.numel() != dim:
                raise RuntimeError(f"vLLM's cache write put {where.numel()} of {dim} channels where expected")
            into[token] = where[(written[where] * sign).argsort()]
    return PageLayout(offsets[1], offsets[-1])
