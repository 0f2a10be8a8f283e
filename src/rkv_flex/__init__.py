"""rkv_flex: R-KV redundancy-aware KV cache compression for Hugging Face reasoning models.

from rkv_flex import patch_model
patch_model(model, budget=1024)     # every later model.generate(...) keeps <= budget + buffer KV slots per layer
"""

from .cache import RKVCache
from .config import RKVConfig
from .engine import Completion, Engine, generate
from .patch import is_patched, make_cache, patch_model, unpatch_model
from .policies import H2O, RKV, Full, Policy, Random, ScoringFunction, SlotState, SnapKV, Streaming
from .tools.check import CheckReport, check

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
