"""TriAttention's query statistics in a file: written by ``rkv-flex calibrate``, read by ``RKVConfig(statistics=)``.

The file is safetensors (loading it runs no code): per attention layer ``i`` that computes keys, ``layers.i.center``
[Hq, D] (the mean pre-RoPE query of each query head, in the model's dimension order) and ``layers.i.magnitude``
[Hq, D/2] (the mean magnitude of each of its RoPE pairs), fp32; the metadata names the format, the model type, the
layer and head counts and how many tokens were read.
"""

from __future__ import annotations

from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "rkv_flex-triattention-1"


def save_statistics(path: str, model_type: str, moments: dict[int, Tensor], tokens: int) -> None:
    """Write each layer's query moments [Hq, D + D/2 + 1] (sums and count, as the cache keeps them) as means."""
    tensors = {}
    for index, sums in moments.items():
        dim = (sums.shape[-1] - 1) * 2 // 3
        mean = sums[..., :-1] / sums[..., -1:].clamp(min=1.0)
        tensors[f"layers.{index}.center"] = mean[..., :dim].contiguous().float().cpu()
        tensors[f"layers.{index}.magnitude"] = mean[..., dim:].contiguous().float().cpu()
    layers = ",".join(map(str, moments))
    metadata = {"format": FORMAT, "model_type": model_type, "layers": layers, "tokens": str(tokens)}
    save_file(tensors, path, metadata=metadata)


def load_statistics(path: str, model: Any, expected: dict[int, tuple[int, int]]) -> dict[int, tuple[Tensor, Tensor]]:
    """Each layer's (centre, magnitude), checked against the model: ``expected`` maps each layer that computes keys to
    its (query heads, head dim). Raises a ValueError naming what does not match."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an rkv_flex calibration file (format {metadata.get('format')!r})")
        model_type = model.config.model_type
        if metadata.get("model_type") != model_type:
            raise ValueError(f"{path} was calibrated on a {metadata.get('model_type')} model, not {model_type}")
        stored = set(handle.keys())
        statistics = {}
        for index, (heads, dim) in expected.items():
            names = (f"layers.{index}.center", f"layers.{index}.magnitude")
            if not stored.issuperset(names):
                raise ValueError(f"{path} has no statistics for layer {index}")
            center, magnitude = (handle.get_tensor(name) for name in names)
            if tuple(center.shape) != (heads, dim) or tuple(magnitude.shape) != (heads, dim // 2):
                raise ValueError(
                    f"{path}: layer {index} holds statistics of shape {tuple(center.shape)}, the model has {heads} "
                    f"query heads of {dim}"
                )
            statistics[index] = (center.float(), magnitude.float())
    return statistics
