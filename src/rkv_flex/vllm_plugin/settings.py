"""Per-engine settings and the checks an engine must pass before the plugin compresses anything.

An engine turns the plugin on with ``additional_config={"rkv_flex": {"budget": 512, ...}}`` (``--additional-config``
on the command line). Without that key the hooks leave vLLM exactly as it is. Everything refused is refused when the
engine starts, by name, before any request runs.
"""

from __future__ import annotations

from typing import Any

from ..config import RKVConfig

SUPPORTED_VLLM = "0.32.0"
SETTINGS_KEY = "rkv_flex"
# Fields of RKVConfig the plugin honours; the others are about rkv_flex's transformers drivers
FIELDS = ("budget", "buffer", "window", "policy", "lam", "kernel", "threshold", "sinks", "seed")
# Scored from the held slots and the newest queries alone (TriAttention and H2O keep statistics the plugin does not)
POLICIES = ("rkv", "snapkv", "streaming", "random")
# Every layer full attention with one KV cache group, RoPE applied before the cache (tested on tiny configs)
MODEL_TYPES = ("llama", "qwen2", "qwen3")


def engine_settings(vllm_config: Any) -> RKVConfig | None:
    """The engine's settings, or None when the plugin is off for it. Raises ValueError naming what it refuses."""
    extra = vllm_config.additional_config
    raw = extra.get(SETTINGS_KEY) if isinstance(extra, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"additional_config[{SETTINGS_KEY!r}] must be a dict of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"rkv_flex's vLLM plugin does not take {unknown}; it takes {list(FIELDS)}")
    settings = RKVConfig(**{"policy": "rkv", **raw})
    if settings.policy not in POLICIES:
        raise ValueError(f"rkv_flex's vLLM plugin scores with {list(POLICIES)}, not {settings.policy!r}")
    check_engine(vllm_config)
    return settings


def check_engine(vllm_config: Any) -> None:
    """Refuse, with the reason, an engine the plugin cannot compress exactly."""
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM:
        raise ValueError(f"rkv_flex's vLLM plugin supports vLLM {SUPPORTED_VLLM} exactly; this is {vllm.__version__}")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ValueError(
            "rkv_flex's vLLM plugin compacts pages in the layout of vLLM's CPU attention; the other platforms' "
            "attention backends are not built"
        )
    refusals = {
        "prefix caching is on (enable_prefix_caching=False): a compacted page no longer holds the prefix its hash "
        "names": vllm_config.cache_config.enable_prefix_caching,
        "speculative decoding is on: draft tokens would be written into slots the compaction rule does not count": (
            vllm_config.speculative_config is not None
        ),
        "the KV cache is quantized (kv_cache_dtype must be 'auto')": vllm_config.cache_config.cache_dtype != "auto",
        "vLLM's V2 model runner is selected: the plugin hooks the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0)": (
            vllm_config.use_v2_model_runner
        ),
        "tensor or pipeline parallelism is on, which has not been tested with the plugin": (
            vllm_config.parallel_config.tensor_parallel_size > 1
            or vllm_config.parallel_config.pipeline_parallel_size > 1
        ),
    }
    for reason, refused in refusals.items():
        if refused:
            raise ValueError(f"rkv_flex's vLLM plugin refuses this engine: {reason}")
    model_type = vllm_config.model_config.hf_config.model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"rkv_flex's vLLM plugin does not compress model type {model_type!r}; it serves {list(MODEL_TYPES)}"
        )
    window = getattr(vllm_config.model_config.hf_config, "sliding_window", None)
    if window is not None and getattr(vllm_config.model_config.hf_config, "use_sliding_window", True):
        raise ValueError("rkv_flex's vLLM plugin serves full-attention layers; this model has sliding windows")
