"""Rotary position embedding as a frequency per pair of dimensions: what TriAttention's score needs of a layer.

transformers rotates pairs ``(x[f], x[f + R/2])`` of a head's first ``R`` dimensions by the angle ``p * omega_f`` at
position ``p`` and multiplies them by ``s`` (YaRN's attention factor; 1 for the default, llama3 and LongRoPE within
its short range). Partial rotary (``R < D``) passes the other dimensions through unchanged. Here every head
dimension belongs to one pair: the unrotated ones pair up as ``(x[R + j], x[R + (D - R)/2 + j])`` with frequency 0
and amplitude 1, and a layer without RoPE (SmolLM3's and EXAONE 4's NoPE layers) is all such pairs. One formula then
serves every layer, and :func:`invert` undoes :func:`rotate` exactly.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope:
    """One layer's rotation: ``omega`` [F] radians per position and ``amplitude`` [F] of each of the ``F = D/2``
    pairs (fp32), and ``rotary`` the dimensions rotated (pair ``f < R/2`` is ``(f, f + R/2)``)."""

    omega: Tensor
    amplitude: Tensor
    rotary: int

    @classmethod
    def none(cls, head_dim: int) -> Rope:
        """A layer without rotary embedding."""
        pairs = head_dim // 2
        return cls(torch.zeros(pairs), torch.ones(pairs), 0)

    def to(self, device: torch.device) -> Rope:
        return Rope(self.omega.to(device), self.amplitude.to(device), self.rotary)


def pair_index(head_dim: int, rotary: int) -> tuple[Tensor, Tensor]:
    """The dimensions holding each pair's real and imaginary part."""
    half, rest = rotary // 2, (head_dim - rotary) // 2
    real = torch.cat([torch.arange(half), rotary + torch.arange(rest)])
    return real, torch.cat([half + torch.arange(half), rotary + rest + torch.arange(rest)])


def split_pairs(x: Tensor, rotary: int) -> tuple[Tensor, Tensor]:
    """``x`` [..., D] as its pairs' real and imaginary parts [..., F]."""
    real, imag = pair_index(x.shape[-1], rotary)
    return x[..., real.to(x.device)], x[..., imag.to(x.device)]


def join_pairs(real: Tensor, imag: Tensor, rotary: int) -> Tensor:
    head_dim = 2 * real.shape[-1]
    out = real.new_empty(*real.shape[:-1], head_dim)
    real_at, imag_at = pair_index(head_dim, rotary)
    out[..., real_at.to(out.device)] = real
    out[..., imag_at.to(out.device)] = imag
    return out


def rotate(x: Tensor, positions: Tensor, rope: Rope) -> Tensor:
    """``x`` [B, H, L, D] placed at ``positions`` [B, L], as the model's RoPE does it."""
    return _turn(x, positions, rope, sign=1.0)


def invert(x: Tensor, positions: Tensor, rope: Rope) -> Tensor:
    """The inverse of :func:`rotate`: ``x`` [B, H, L, D] as it was before RoPE at ``positions`` [B, L]."""
    return _turn(x, positions, rope, sign=-1.0)


def unrotated_sums(x: Tensor, positions: Tensor, weight: Tensor, rope: Rope, pairs: tuple[Tensor, Tensor]) -> Tensor:
    """[B, H, D + F]: the ``weight`` [B, L]-weighted sums over L of queries ``x`` [B, H, L, D] at ``positions``
    [B, L] as they were before RoPE (in their own dimension order), then of each pair's magnitude, which the
    rotation scales by its amplitude and otherwise keeps. ``pairs``: :func:`pair_index` on ``x``'s device (made once
    per layer: a decoding step calls this per layer). Summed over L as it goes: no [B, H, L, D] tensor is written
    back, which made a prompt's statistics cost 15% of its forward."""
    real_at, imag_at = pairs
    x = x.float()
    real, imag = x[..., real_at], x[..., imag_at]
    angle = positions.float()[:, None, :, None] * rope.omega
    weight = weight.float()[:, None, :, None] / rope.amplitude
    cos, sin = torch.cos(angle) * weight, torch.sin(angle) * weight  # [B, 1, L, F]
    head_dim = x.shape[-1]
    out = x.new_empty(*x.shape[:2], head_dim + head_dim // 2)
    out[..., real_at] = (real * cos + imag * sin).sum(dim=2)
    out[..., imag_at] = (imag * cos - real * sin).sum(dim=2)
    out[..., head_dim:] = (torch.hypot(real, imag) * weight).sum(dim=2)
    return out


def _turn(x: Tensor, positions: Tensor, rope: Rope, sign: float) -> Tensor:
    real, imag = split_pairs(x.float(), rope.rotary)
    angle = positions.float()[:, None, :, None] * rope.omega * sign
    gain = rope.amplitude if sign > 0 else 1.0 / rope.amplitude
    cos, sin = torch.cos(angle) * gain, torch.sin(angle) * gain
    return join_pairs(real * cos - imag * sin, imag * cos + real * sin, rope.rotary)


# -- reading a model's rotation --------------------------------------------------------------------------------------
class RopeUnreadable(ValueError):
    """The model's rotation cannot be written as TriAttention's frequencies per pair (``policy="auto"`` then uses
    R-KV)."""


ATTENTION = ("full_attention", "sliding_attention", "hybrid")  # hybrid: attention beside a Mamba mixer
# Models whose attention layers never rotate when they have no rotary module (Granite 4.0-H with
# position_embedding_type other than "rope"; Nemotron-H's attention has no RoPE at all)
WITHOUT_ROPE = ("granitemoehybrid", "nemotron_h")
PROBE_POSITIONS = (0, 1, 2, 7, 30, 100)  # within any LongRoPE short range


def model_ropes(model: Any, head_dims: list[int], kinds: list[str]) -> list[Rope | None]:
    """Each attention layer's rotation, read from the model's own rotary module and checked against its own
    ``apply_rotary_pos_emb`` on random vectors (None for a layer without attention). Raises a ValueError naming the
    reason where the rotation cannot be written as frequencies per pair."""
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None and model.config.model_type in WITHOUT_ROPE:
        return [Rope.none(dim) if kind in ATTENTION else None for kind, dim in zip(kinds, head_dims, strict=True)]
    if rotary is None:
        raise RopeUnreadable(
            f"{model.config.model_type} has no rotary module (model.model.rotary_emb) to read RoPE from"
        )
    apply = getattr(sys.modules[type(inner).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise RopeUnreadable(f"{model.config.model_type} has no apply_rotary_pos_emb to check the rotation against")
    by_type = "layer_type" in inspect.signature(rotary.forward).parameters
    uses_rope = rope_layers(model)
    ropes: list[Rope | None] = []
    found: dict[str, Rope] = {}
    for index, kind in enumerate(kinds):
        if kind not in ATTENTION:
            ropes.append(None)
        elif not uses_rope[index]:
            ropes.append(Rope.none(head_dims[index]))
        else:
            if kind not in found:
                found[kind] = read_rope(rotary, apply, head_dims[index], kind if by_type else None, model)
            ropes.append(found[kind])
    return ropes


def rope_layers(model: Any) -> list[bool]:
    """Whether each layer rotates its queries and keys (SmolLM3 marks NoPE layers; EXAONE 4's full layers are NoPE
    when the model has sliding ones)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = text.num_hidden_layers
    if getattr(text, "no_rope_layers", None) is not None:
        return [bool(flag) for flag in text.no_rope_layers]
    if text.model_type == "exaone4" and getattr(text, "sliding_window", None) is not None:
        return [kind == "sliding_attention" for kind in text.layer_types]
    return [True] * layers


def read_rope(rotary: Any, apply: Any, head_dim: int, layer_type: str | None, model: Any) -> Rope:
    parameters = getattr(rotary, "rope_type", None) or ""
    if "dynamic" in str(parameters):
        raise RopeUnreadable(
            "dynamic NTK RoPE changes its frequencies with the sequence length; TriAttention needs fixed"
        )
    positions = torch.tensor([PROBE_POSITIONS], dtype=torch.long)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        extra = {} if layer_type is None else {"layer_type": layer_type}
        cos, sin = rotary(probe, positions.to(_device(rotary)), **extra)
    cos, sin = cos.float().cpu()[0], sin.float().cpu()[0]  # [P, R] (both halves) or [P, R/2] (gpt-oss)
    span = cos.shape[-1]
    duplicated = span % 2 == 0 and torch.equal(cos[:, : span // 2], cos[:, span // 2 :])
    pairs = span // 2 if duplicated else span
    amplitude = torch.ones(head_dim // 2)
    amplitude[:pairs] = torch.hypot(cos[0, :pairs], sin[0, :pairs])
    omega = torch.zeros(head_dim // 2)
    omega[:pairs] = torch.atan2(sin[1, :pairs], cos[1, :pairs])
    rope = Rope(omega, amplitude, 2 * pairs)
    check_rope(rope, apply, cos, sin, positions, head_dim, model.config.model_type)
    return rope


def check_rope(rope: Rope, apply: Any, cos: Tensor, sin: Tensor, positions: Tensor, head_dim: int, name: str) -> None:
    """The model's own rotation of random vectors must equal :func:`rotate`'s (else: not frequencies per pair)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, positions.shape[1], head_dim, generator=generator)
    with torch.no_grad():
        if list(inspect.signature(apply).parameters)[1:2] == ["cos"]:  # Gemma 3n / 4 rotate one tensor at a time
            expected = apply(q, cos[None], sin[None], unsqueeze_dim=1)
        else:
            expected, _ = apply(q, q.clone(), cos[None], sin[None])
    got = rotate(q, positions, rope)
    if not torch.allclose(got, expected.float(), rtol=1e-4, atol=1e-4):
        raise RopeUnreadable(
            f"{name}'s rotary embedding is not a rotation of the pairs (x[f], x[f + R/2]) that TriAttention's score "
            "is written for (interleaved pairs, or a rotation applied outside apply_rotary_pos_emb)"
        )


def _device(module: Any) -> torch.device:
    buffers = list(module.buffers())
    return buffers[0].device if buffers else torch.device("cpu")
