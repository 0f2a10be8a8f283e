"""rkv_flex: R-KV redundancy-aware KV cache compression for Hugging Face reasoning models.

from rkv_flex import patch_model
patch_model(model, budget=1024)     # every later model.generate(...) keeps <= budget + buffer KV slots per layer

The names below are imported on first use. The scoring core (``rkv_flex.config``, ``rkv_flex.policies``,
``rkv_flex.scoring``, ``rkv_flex.rope``) needs only torch, einops and attn-gym, so it also imports where the installed
transformers is not one rkv_flex patches (another serving engine's environment).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {  # public name -> the module that defines it
    "RKVCache": "cache",
    "RKVConfig": "config",
    "Completion": "engine",
    "Engine": "engine",
    "generate": "engine",
    "is_patched": "patch",
    "make_cache": "patch",
    "patch_model": "patch",
    "unpatch_model": "patch",
    "H2O": "policies",
    "RKV": "policies",
    "Full": "policies",
    "Policy": "policies",
    "Random": "policies",
    "ScoringFunction": "policies",
    "SlotState": "policies",
    "SnapKV": "policies",
    "Streaming": "policies",
    "CheckReport": "tools.check",
    "check": "tools.check",
}
__all__ = [
    "H2O",
    "RKV",
    "CheckReport",
    "Completion",
    "Engine",
    "Full",
    "Policy",
    "RKVCache",
    "RKVConfig",
    "Random",
    "ScoringFunction",
    "SlotState",
    "SnapKV",
    "Streaming",
    "check",
    "generate",
    "is_patched",
    "make_cache",
    "patch_model",
    "unpatch_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'rkv_flex' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:
    from .cache import RKVCache
    from .config import RKVConfig
    from .engine import Completion, Engine, generate
    from .patch import is_patched, make_cache, patch_model, unpatch_model
    from .policies import H2O, RKV, Full, Policy, Random, ScoringFunction, SlotState, SnapKV, Streaming
    from .tools.check import CheckReport, check
