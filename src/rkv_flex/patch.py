"""patch_model / unpatch_model: the only place that touches model objects.

Patching registers the ``rkv_flex`` attention (and its padding-mask function) with transformers, switches the
model's attention implementation to it, and gives the model an instance-level ``generate`` that supplies an
:class:`RKVCache`. Nothing of the model's class or weights changes; unpatching removes all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTENTION_NAME, padding_mask, rkv_attention
from .cache import RKVCache
from .config import RKVConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_PATCH_ATTR = "_rkv_flex_patch"


@dataclass(frozen=True)
class PatchRecord:
    """What patching changed, to undo it exactly."""

    config: RKVConfig
    previous_attention: str


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, rkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"rkv_flex does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not hasattr(model, "generate") or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a transformers generative model")
    if is_patched(model):
        raise ValueError(f"this {type(model).__name__} is already patched by rkv_flex; call unpatch_model first")


def is_patched(model: Any) -> bool:
    return _PATCH_ATTR in getattr(model, "__dict__", {})


def patch_record(model: Any) -> PatchRecord:
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched by rkv_flex; call patch_model first")
    return model.__dict__[_PATCH_ATTR]


def patch_model(model: Any, config: RKVConfig | None = None, /, **options: Any) -> Any:
    """Make every later ``model.generate(...)`` keep at most ``budget + buffer`` KV slots per layer.

    Pass either an :class:`RKVConfig` or its fields as keywords (``budget`` is required). Returns the same model.
    """
    if config is not None and options:
        raise TypeError("pass either an RKVConfig or keyword options, not both")
    if config is None:
        config = RKVConfig(**options)
    elif not isinstance(config, RKVConfig):
        raise TypeError(f"config must be an RKVConfig, got {type(config).__name__}")
    _check_model(model)
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    model.__dict__[_PATCH_ATTR] = PatchRecord(config, previous)
    model.generate = _patched_generate.__get__(model)
    return model


def unpatch_model(model: Any) -> Any:
    """Undo :func:`patch_model`: stock attention implementation and ``generate`` again. Returns the same model."""
    record = patch_record(model)
    model.set_attn_implementation(record.previous_attention)
    del model.__dict__["generate"]
    del model.__dict__[_PATCH_ATTR]
    return model


def make_cache(model: Any) -> RKVCache:
    """A fresh slot cache for a patched model, for callers that run ``model(...)`` themselves."""
    return RKVCache.for_model(model.config, patch_record(model).config)


def check_prompt(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    """Refuse prompts without tokens before any work starts."""
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] == 0:
        raise ValueError("the prompt has no tokens (input_ids has length 0)")
    if attention_mask is not None and attention_mask.ndim == 2:
        empty = (attention_mask.sum(dim=-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt rows {empty} have no tokens (their attention_mask is all zeros)")


class CompactionScheduler(LogitsProcessor):
    """Plans each next forward on the host between transformers' forwards.

    transformers calls logits processors eagerly after every forward, also when it compiles the forward itself
    (``compile_config``, or automatically on CUDA); a compiled forward cannot plan its own compaction.
    """

    def __init__(self, cache: RKVCache):
        self.cache = cache

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.cache.begin_step(1)
        return scores


def _patched_generate(model: Any, *args: Any, **kwargs: Any):
    """``generate`` of a patched model: the stock one, with an RKVCache unless the caller passed one."""
    record = patch_record(model)
    for name in ("cache", "past_key_values"):
        given = kwargs.get(name)
        if given is not None and not isinstance(given, RKVCache):
            raise TypeError(
                f"a model patched by rkv_flex needs an RKVCache, got {type(given).__name__} as {name}=; "
                "omit it (generate makes one) or pass rkv_flex.make_cache(model)"
            )
    generation_config = kwargs.get("generation_config") or model.generation_config
    implementation = kwargs.get("cache_implementation") or generation_config.cache_implementation
    if implementation is not None:
        raise ValueError(
            f"cache_implementation={implementation!r} conflicts with rkv_flex, which supplies its own cache"
        )
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    check_prompt(input_ids, kwargs.get("attention_mask"))
    if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
        kwargs["cache"] = RKVCache.for_model(model.config, record.config)
    cache = kwargs.get("cache") or kwargs.get("past_key_values")
    kwargs["logits_processor"] = LogitsProcessorList(
        [*(kwargs.get("logits_processor") or []), CompactionScheduler(cache)]
    )
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        cache.cancel_plan()
