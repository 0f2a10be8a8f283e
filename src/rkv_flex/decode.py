"""The compiled decoding loop: eager prefill, then one captured graph per decode step and one per compaction.

``generate`` prefills eagerly through the patched model (the slot cache compacts a long prompt itself), then
alternates two compiled functions driven by host-side counters:

* the decode step: the model's forward for one token per sequence, the choice of the next token (greedy or
  sampled, on the device) and the end-of-sequence bookkeeping, all writing in place into fixed buffers;
* the compaction of every layer, run when the slots are full, every ``buffer`` steps.

Both are compiled with ``fullgraph=True, dynamic=False`` (on CUDA with ``mode="reduce-overhead"``: CUDA graphs).
The cache and the step buffers are kept per (model, batch, dtype, device) and reset between calls, so their
addresses never change and the graphs are captured once and replayed for every later prompt.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .cache import RKVCache, compact_layers
from .compiled import compiled
from .forward import feed, positions_from_mask
from .patch import check_prompt, make_cache, patch_record
from .policies import make_policy
from .sampling import Sampling, choose_next


@dataclass
class StepBuffers:
    """Fixed-address inputs/outputs of the decode graph, updated in place: [B, 1] tokens and positions, [B] done."""

    tokens: Tensor
    positions: Tensor
    finished: Tensor
    stop_ids: Tensor  # end-of-sequence ids, [n] (n >= 1; -1 when none)
    pad_id: Tensor


def decode_step(model: Any, cache: RKVCache, buffers: StepBuffers, sampling: Sampling) -> None:
    """One token per sequence through the model, next token chosen, finished rows frozen on the pad token."""
    logits = model(input_ids=buffers.tokens, position_ids=buffers.positions, cache=cache, use_cache=True).logits
    chosen = choose_next(logits[:, -1], sampling)
    chosen = torch.where(buffers.finished, buffers.pad_id, chosen)
    buffers.finished.logical_or_(torch.isin(chosen, buffers.stop_ids))
    buffers.tokens.copy_(chosen[:, None])
    buffers.positions.add_(1)


class CompiledGraphs:
    """The two compiled functions for one device type."""

    def __init__(self, device_type: str):
        mode = "reduce-overhead" if device_type == "cuda" else None
        self.decode = compiled(decode_step, mode)
        self.compact = compiled(compact_layers, mode)


_graphs: dict[str, CompiledGraphs] = {}
_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_last_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_cache(model: Any) -> RKVCache:
    """The slot cache the compiled loop used in its latest call for ``model`` (to inspect it)."""
    if model not in _last_cache:
        raise ValueError("rkv_flex.generate has not run on this model yet")
    return _last_cache[model]


def graphs_for(device: torch.device) -> CompiledGraphs:
    if device.type not in _graphs:
        _graphs[device.type] = CompiledGraphs(device.type)
    return _graphs[device.type]


@dataclass
class Session:
    """A cache and step buffers kept for one (model, batch, dtype, device, capacity): stable addresses."""

    cache: RKVCache
    buffers: StepBuffers


def session_for(model: Any, batch: int, device: torch.device, capacity: int) -> Session:
    per_model = _sessions.setdefault(model, {})
    config = patch_record(model).config
    key = (batch, model.dtype, device, capacity, config)
    if key not in per_model:
        cache = make_cache(model)
        for layer in cache.layers:
            layer.capacity = capacity
        buffers = StepBuffers(
            tokens=torch.zeros(batch, 1, dtype=torch.long, device=device),
            positions=torch.zeros(batch, 1, dtype=torch.long, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            stop_ids=torch.full((1,), -1, dtype=torch.long, device=device),
            pad_id=torch.zeros((), dtype=torch.long, device=device),
        )
        for tensor in (buffers.tokens, buffers.positions, buffers.finished):
            torch._dynamo.mark_static_address(tensor)
        per_model[key] = Session(cache, buffers)
    session = per_model[key]
    session.cache.reset()
    _last_cache[model] = session.cache
    return session


def _stop_ids(eos_token_id: int | list[int] | None, model: Any) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _check_inputs(model: Any, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, prompt length]")
    check_prompt(input_ids, attention_mask)
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tensor is not None and tensor.device != model.device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {model.device}; move it first")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")


@torch.no_grad()
def generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    compile: bool = True,
    stop_check_every: int = 16,
) -> Tensor:
    """Decode with the patched model's slot cache; returns [B, prompt + new] token ids like ``model.generate``.

    Greedy output equals the patched model's eager ``generate`` for the same config. Rows that emit an
    end-of-sequence id are padded from then on; the loop ends early once every row is done (checked every
    ``stop_check_every`` steps, the only host sync besides streaming). ``compile=False`` runs the same loop eagerly.
    The prompt is fed in ``prefill_chunk`` pieces (the patch's config).
    """
    record = patch_record(model)
    _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    sampling = Sampling(do_sample, temperature, top_p, top_k)
    batch, prompt = input_ids.shape
    device = input_ids.device
    capacity = record.config.capacity
    if not make_policy(record.config).evicts:  # a cache that never evicts holds everything
        capacity = max(capacity, -(-(prompt + max_new_tokens) // 128) * 128)
    session = session_for(model, batch, device, capacity)
    cache, buffers = session.cache, session.buffers
    graphs = graphs_for(device) if compile else None
    # A user scorer compacts eagerly: its output is checked, and it need not be traceable.
    cache.compactor = graphs.compact if compile and cache.policy.traceable else compact_layers
    stop_ids = _stop_ids(eos_token_id, model)
    pad_id = pad_token_id if pad_token_id is not None else getattr(model.generation_config, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = positions_from_mask(attention_mask)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    config = record.config
    chunk = config.prefill_chunk if config.compact_prompt else None
    first = choose_next(feed(model, cache, input_ids, attention_mask, 0, prompt, chunk), sampling)
    stops = torch.tensor(stop_ids or [-1], dtype=torch.long, device=device)
    buffers.stop_ids = stops
    buffers.pad_id.fill_(pad_id)
    buffers.finished.copy_(torch.isin(first, stops))
    buffers.tokens.copy_(first[:, None])
    buffers.positions.copy_(positions[:, -1:] + 1)
    generated = [first[:, None].clone()]
    if streamer is not None:
        streamer.put(first.cpu())
    step = graphs.decode if compile else decode_step
    for index in range(1, max_new_tokens):
        if stop_ids and index % stop_check_every == 0 and bool(buffers.finished.all()):
            break
        cache.begin_step(1)
        step(model, cache, buffers, sampling)
        generated.append(buffers.tokens.clone())
        if streamer is not None:
            streamer.put(generated[-1][:, 0].cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, *generated], dim=1)
