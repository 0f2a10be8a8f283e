"""Compiled FlexAttention serves a shape only after it has been checked on this machine.

torch's compiled CPU flex kernel is wrong for some shapes on some machines. With torch 2.13 generating AVX2 code (a
CPU without AVX-512, or ``torch._inductor.config.cpp.simdlen = 256``), head dim 16 over 40 slots returns NaN or
errors of order one, and two identical calls differ, while the eager computation is right. So the first time a
compiled flex kernel would serve a shape (batch, heads, slots, head size, dtype, device, sliding window, soft-cap,
sinks), it runs on synthetic slots of that shape in three layouts (a fresh cache, slots after compactions in any
order, full slots) next to the dense SDPA reference. A kernel that disagrees is never used for that shape: attention
runs its SDPA kernel instead, and a warning names the shape and the torch version. ``RKVConfig(check_kernels=False)``
trusts flex without checking.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .compiled import GraphStore
from .kernels import Segments, flex_decode, flex_span, masked_sdpa

LAYOUTS = ("fresh", "compacted", "full")
FRESH_TOKENS = 5  # valid slots of the "fresh" layout (a short prompt, nothing evicted yet)


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error a right kernel shows against the fp32 reference (16-bit outputs round at ~4e-3)."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max(1, max |want|), infinite if ``got`` holds NaN or inf."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def synthetic_slots(
    batch: int, kv_heads: int, slots: int, layout: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """valid [B, Hkv, S] and distinct positions [B, Hkv, S] in [0, 3S) of slots in ``layout``; slot 0 is always
    valid (every query sees something)."""
    if layout == "fresh":
        valid = torch.arange(slots) < min(FRESH_TOKENS, slots)
        valid = valid.expand(batch, kv_heads, slots).clone()
        pos = torch.arange(slots).expand(batch, kv_heads, slots).clone()
        return valid, pos
    if layout == "full":
        return torch.ones(batch, kv_heads, slots, dtype=torch.bool), torch.arange(slots).repeat(batch, kv_heads, 1)
    valid = torch.rand(batch, kv_heads, slots, generator=generator) < 0.6
    valid[:, :, 0] = True
    pos = torch.stack([torch.randperm(3 * slots, generator=generator)[:slots] for _ in range(batch * kv_heads)])
    return valid, pos.view(batch, kv_heads, slots)


def span_error(
    kernel: Callable,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: Tensor | None,
    sink_slot: int | None,
) -> float:
    """The largest relative error of ``kernel`` (:func:`flex_span`'s signature) against :func:`masked_sdpa` on
    synthetic inputs of the shapes of the arguments: the first ``S - L`` slots in each layout, then L new tokens (the
    last quarter of them bucket padding, position -1) at positions after every slot. Every real query sees at least
    its own token (the reference and flex differ, by design, only for queries that may see nothing)."""
    batch, length = query.shape[0], query.shape[2]
    kv_heads, slots = key.shape[1], key.shape[2]
    used, real = slots - length, length if length == 1 else length - length // 4
    # where the new tokens sit: after the used slots, or (one token) in the first slot, as a decoding step may
    new = slice(0, 1) if length == 1 else slice(used, slots)
    generator = torch.Generator().manual_seed(slots * 31 + length)
    worst = 0.0
    for layout in LAYOUTS:
        valid, pos = synthetic_slots(batch, kv_heads, slots, layout, generator)
        new_pos = 3 * slots + torch.arange(length)
        valid[:, :, new] = torch.arange(length) < real
        pos = pos.clone()
        pos[:, :, new] = new_pos
        query_pos = torch.where(torch.arange(length) < real, new_pos, -1).expand(batch, length)
        inputs = random_like(generator, query, key, value)
        if sink_slot is not None:  # the sink slot holds no token: zero key and value, never valid
            valid[:, :, sink_slot] = False
            inputs[1][:, :, sink_slot] = 0
            inputs[2][:, :, sink_slot] = 0
        valid, pos, query_pos = (t.to(query.device) for t in (valid, pos, query_pos))
        got = kernel(*inputs, valid, pos, query_pos, scale, sliding_window, softcap, sinks, sink_slot)
        q, k, v = (t.float() for t in inputs)
        want = masked_sdpa(q, k, v, valid, pos, query_pos, scale, sliding_window, softcap, sinks)
        worst = max(worst, relative_error(got[:, :, :real], want[:, :, :real]))
    return worst


def pool_decode_error(
    kernel: Callable,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kv_heads: int,
    room: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: Tensor | None,
    sink_slot: int | None,
) -> float:
    """:func:`span_error` for :func:`flex_decode` over a pool (one query per row over [B, 1, P] slots, ``kv_heads``
    segments with ``room`` free slots each): segments split evenly, or unevenly with random slots valid."""
    batch, pool = query.shape[0], key.shape[2]
    token_slots = pool - (sink_slot is not None)
    budget = token_slots // kv_heads - room
    generator = torch.Generator().manual_seed(pool * 31 + kv_heads)
    worst = 0.0
    for layout in LAYOUTS:
        kept = torch.full((batch, kv_heads), budget)
        if layout == "compacted" and kv_heads > 1:  # move up to half a budget from odd heads to even ones
            shift = torch.randint(0, budget // 2 + 1, (batch, kv_heads // 2), generator=generator)
            kept[:, 0 : 2 * (kv_heads // 2) : 2] += shift
            kept[:, 1 : 2 * (kv_heads // 2) : 2] -= shift
        segment = kept + room
        start = segment.cumsum(dim=1) - segment
        slot = torch.arange(pool)
        owned = (slot >= start[..., None]) & (slot < (start + segment)[..., None])  # [B, Hkv, P]
        valid, pos = synthetic_slots(batch, 1, pool, layout, generator)
        if layout == "fresh":  # the first slots of every segment
            valid = (owned & (slot < start[..., None] + FRESH_TOKENS)).any(dim=1, keepdim=True)
        inputs = random_like(generator, query, key, value)
        if sink_slot is not None:
            valid[:, :, sink_slot] = False
            inputs[1][:, :, sink_slot] = 0
            inputs[2][:, :, sink_slot] = 0
        query_pos = pos.amax(dim=(1, 2))[:, None] + 1
        for row in range(batch):  # the new token, at the query's position, in every head's segment
            valid[row, 0, start[row]] = True
            pos[row, 0, start[row]] = query_pos[row, 0]
        device = query.device
        valid, pos, query_pos, start, kept = (t.to(device) for t in (valid, pos, query_pos, start, kept))
        segments = (start, kept, room)
        got = kernel(*inputs, valid, pos, query_pos, scale, sliding_window, softcap, sinks, sink_slot, segments)
        q, k, v = (t.float() for t in inputs)
        every_head = (-1, kv_heads, -1)
        want = masked_sdpa(
            q,
            k.expand(*every_head, -1),
            v.expand(*every_head, -1),
            valid.expand(every_head) & owned.to(device),
            pos.expand(every_head),
            query_pos,
            scale,
            sliding_window,
            softcap,
            sinks,
        )
        worst = max(worst, relative_error(got, want))
    return worst


def random_like(generator: torch.Generator, *tensors: Tensor) -> list[Tensor]:
    """Standard normal tensors of the shapes, dtypes and devices of ``tensors``."""
    return [torch.randn(t.shape, generator=generator).to(t.dtype).to(t.device) for t in tensors]


def describe(tensors: dict[str, Tensor], **settings) -> str:
    shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items())
    first = next(iter(tensors.values()))
    named = ", ".join(f"{name}={value}" for name, value in settings.items() if value is not None)
    return f"{shapes}, {first.dtype} on {first.device}" + (f", {named}" if named else "")


class KernelChecks:
    """The compiled flex kernels of one patched model (one graph per shape, in ``graphs``) and, per shape, whether
    the kernel agreed with the dense reference on this machine."""

    def __init__(self, graphs: GraphStore | None = None, enabled: bool = True):
        self.graphs = graphs if graphs is not None else GraphStore()
        self.enabled = enabled
        self.errors: dict[tuple, float] = {}  # (kernel, shape key) -> largest relative error measured

    def _trusted(self, key: tuple, measure: Callable[[], float], dtype: torch.dtype, shape: str) -> bool:
        if not self.enabled:
            return True
        if key not in self.errors:
            self.errors[key] = measure()
            if not self.errors[key] <= tolerance(dtype):
                warnings.warn(
                    f"compiled FlexAttention ({key[0]}) is wrong on this machine for {shape} (torch "
                    f"{torch.__version__}: relative error {self.errors[key]:.2g} against SDPA); rkv_flex uses SDPA "
                    "for this shape instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return self.errors[key] <= tolerance(dtype)

    def span(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        valid: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
        sinks: Tensor | None = None,
        sink_slot: int | None = None,
    ) -> Tensor | None:
        """Compiled :func:`flex_span` over these inputs, or None when it is not trusted for their shape."""
        shape = shape_key(query, key, value, sinks, scale, sliding_window, softcap, sink_slot)
        kernel = self.graphs.get(flex_span, shape)
        settings = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, sink_slot=sink_slot)

        def measure() -> float:
            return span_error(kernel, query, key, value, scale, sliding_window, softcap, sinks, sink_slot)

        described = describe(dict(query=query, key=key, value=value), **settings)
        if not self._trusted(("span", shape), measure, query.dtype, described):
            return None
        return kernel(query, key, value, valid, pos, query_pos, scale, sliding_window, softcap, sinks, sink_slot)

    def decode_trusted(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
        sinks: Tensor | None = None,
        sink_slot: int | None = None,
        segments: Segments | None = None,
    ) -> bool:
        """Whether flex decoding (one query per row, ``query`` [B, Hq, 1, D]) is right over slots shaped like
        ``key`` / ``value`` (only their shapes, dtype and device are read): [B, Hkv, S, D], or a pool [B, 1, P, D]
        of ``segments`` (only the number of heads and the room are read)."""
        shape = shape_key(query, key, value, sinks, scale, sliding_window, softcap, sink_slot)
        settings = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, sink_slot=sink_slot)
        if segments is None:

            def measure() -> float:
                kernel = self.graphs.get(flex_span, shape)
                return span_error(kernel, query, key, value, scale, sliding_window, softcap, sinks, sink_slot)

            described = describe(dict(query=query, key=key, value=value), **settings)
            return self._trusted(("decode", shape), measure, query.dtype, described)
        kv_heads, room = segments[0].shape[1], segments[2]
        shape = (*shape, kv_heads, room)

        def measure_pool() -> float:
            kernel = self.graphs.get(flex_decode, shape)
            return pool_decode_error(
                kernel, query, key, value, kv_heads, room, scale, sliding_window, softcap, sinks, sink_slot
            )

        described = describe(dict(query=query, pool_key=key, pool_value=value), kv_heads=kv_heads, **settings)
        return self._trusted(("pooled decode", shape), measure_pool, query.dtype, described)


def shape_key(query: Tensor, key: Tensor, value: Tensor, sinks: Tensor | None, *settings) -> tuple:
    """What gives a flex kernel another graph: shapes, dtype, device, and the settings baked into its code."""
    tensors = (query, key, value) if sinks is None else (query, key, value, sinks)
    return (*((tuple(t.shape), t.dtype, str(t.device)) for t in tensors), *settings)
