"""patch_model / unpatch_model: the only place that touches model objects.

Patching registers the ``rkv_flex`` attention (and its padding-mask function) with transformers, switches the
model's attention implementation to it, and gives the model an instance-level ``generate`` that supplies an
:class:`RKVCache` and feeds long prompts in chunks. Nothing of the model's class or weights changes; unpatching
removes all of it, with every cache the model held.
"""

from __future__ import annotations

import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTENTION_NAME, padding_mask, rkv_attention
from .cache import LayerSpec, RKVCache, SharedKVLayer, SharesKV
from .compiled import GraphStore
from .config import RKVConfig
from .forward import feed, padded_columns, prompt_pieces
from .kernel_checks import KernelChecks
from .latent import is_latent, latent_config, latent_inputs
from .policies import make_policy
from .rope import Rope, RopeUnreadable, model_ropes


@dataclass(frozen=True)
class Architecture:
    """What serving one architecture takes beyond the slot rule (for the README's table; ``sinks`` also sizes the
    cache). Everything else a model does (q/k norms, partial or interleaved RoPE, MoE feed-forward, multipliers)
    happens before the cache or after attention, and needs nothing."""

    sliding: bool = False  # some or all layers attend a sliding window: masked exactly
    softcap: bool = False  # attention logits are soft-capped: a flex score_mod (attn-gym's)
    sinks: bool = False  # learned per-head attention sinks: one extra zero-valued slot whose score is the sink
    nope: bool = False  # some layers use no rotary embedding: their keys are cached as computed
    moe: bool = False  # mixture-of-experts feed-forward: nothing for the cache to do
    states: bool = False  # hybrid: some layers keep a constant-size state (linear attention, Mamba, convolution)
    beside: bool = False  # each layer runs attention and a Mamba mixer side by side: one cache layer holds both
    shares_kv: bool = False  # later layers attend an earlier layer's keys and values: they read its kept set
    latent: bool = False  # multi-head latent attention: one latent head, queries absorbed (latent.py)


ARCHITECTURES = {
    "llama": Architecture(),
    "mistral": Architecture(sliding=True),
    "qwen2": Architecture(sliding=True),
    "qwen3": Architecture(sliding=True),
    "qwen3_moe": Architecture(sliding=True, moe=True),
    "smollm3": Architecture(sliding=True, nope=True),
    "phi3": Architecture(sliding=True),
    "gpt_oss": Architecture(sliding=True, sinks=True, moe=True),
    "olmo2": Architecture(),
    "olmo3": Architecture(sliding=True),
    "exaone4": Architecture(sliding=True, nope=True),
    "seed_oss": Architecture(),
    "glm4": Architecture(),
    "granite": Architecture(),
    "ministral": Architecture(sliding=True),
    "gemma2": Architecture(sliding=True, softcap=True),
    "gemma3_text": Architecture(sliding=True),
    "gemma3n_text": Architecture(sliding=True, shares_kv=True),
    "gemma4_text": Architecture(sliding=True, shares_kv=True, moe=True),
    "gemma4_unified_text": Architecture(sliding=True, shares_kv=True),
    "glm4_moe": Architecture(moe=True),
    "minimax_m2": Architecture(moe=True),
    "ernie4_5": Architecture(),
    "ernie4_5_moe": Architecture(moe=True),
    "hunyuan_v1_dense": Architecture(),
    "hunyuan_v1_moe": Architecture(moe=True),
    "apertus": Architecture(),
    "arcee": Architecture(),
    "qwen3_5": Architecture(states=True),  # its causal LM (AutoModelForCausalLM), not the vision-language wrapper
    "qwen3_5_text": Architecture(states=True),
    "qwen3_5_moe": Architecture(states=True, moe=True),
    "qwen3_5_moe_text": Architecture(states=True, moe=True),
    "qwen3_next": Architecture(states=True, moe=True),
    "olmo_hybrid": Architecture(states=True),
    "lfm2": Architecture(states=True),
    "nemotron_h": Architecture(states=True, moe=True),
    "granitemoehybrid": Architecture(states=True, moe=True),
    "falcon_h1": Architecture(states=True, beside=True),
    "minimax": Architecture(states=True, moe=True),  # lightning attention: MiniMaxCache's state (lightning.py)
    "deepseek_v2": Architecture(latent=True, moe=True),
    "deepseek_v3": Architecture(latent=True, moe=True),
    "glm4_moe_lite": Architecture(latent=True, moe=True),
    "kimi_linear": Architecture(states=True, latent=True, moe=True),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
REFUSED = {
    "deepseek_v32": "its sparse-attention indexer caches keys of its own for every token and picks the tokens each "
    "query reads from them; evicting latents without those keys (or both consistently) is not built",
    "glm_moe_dsa": "its sparse-attention indexer (DeepSeek-V3.2's) caches keys of its own for every token and picks "
    "the tokens each query reads from them; evicting latents without those keys (or both consistently) is not built",
    "gemma3": "this is the multimodal Gemma 3; load its text model, Gemma3ForCausalLM (model type gemma3_text)",
    "exaone4_5": "this is the multimodal EXAONE 4.5, whose prompts carry image features; its text decoder is "
    "EXAONE 4.0 "
    "(model type exaone4), which rkv_flex serves",
}
_PATCH_ATTR = "_rkv_flex_patch"


@dataclass
class PatchRecord:
    """What patching changed, to undo it exactly, and what the model's own ``generate`` and ``rkv_flex.generate``
    reuse between calls: caches and engines (one per batch, dtype and device: stable addresses, so compiled code
    replays its graphs instead of re-recording them), the compiled graphs of this model and the kernel checks.
    Unpatching releases them."""

    config: RKVConfig
    previous_attention: str
    caches: dict[tuple, RKVCache] = field(default_factory=dict)
    engines: dict[tuple, Any] = field(default_factory=dict)
    graphs: GraphStore = field(default_factory=GraphStore)
    kernels: KernelChecks | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    hooks: list[Any] = field(default_factory=list)  # KV-sharing layers' hooks (handles to remove)
    latent_modules: list[Any] = field(default_factory=list)  # MLA attention given latent_inputs as expand_kv
    ropes: list[Rope | None] | None = None  # each layer's rotation, for policies that track queries
    statistics: dict[int, tuple] | None = None  # calibrated query statistics per layer (RKVConfig.statistics)

    def __post_init__(self) -> None:
        if self.kernels is None:
            self.kernels = KernelChecks(self.graphs, enabled=self.config.check_kernels)

    def release(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for module in self.latent_modules:
            del module.expand_kv  # the class's own again
        self.latent_modules.clear()
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
        self.caches.clear()
        self.graphs.clear()


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, rkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(f"rkv_flex cannot serve model type {model_type!r} exactly: {REFUSED[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"rkv_flex does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_kinds(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ranks = getattr(model, "tp_size", None) or 1
    kv_heads = sorted(set(layer_shapes(text)[0]))
    if any(heads % ranks for heads in kv_heads) or text.num_attention_heads % ranks:
        raise ValueError(
            f"this model is split over {ranks} tensor-parallel ranks, which does not divide its "
            f"{'/'.join(map(str, kv_heads))} KV heads and {text.num_attention_heads} query heads: a KV head (or its "
            "query group) would be split across ranks, and R-KV scores and keeps tokens per whole KV head"
        )
    if latent_config(text) is not None and not any(is_latent(module) for module in model.modules()):
        raise ValueError(
            f"this {model_type} has latent attention whose module does not cache latents and expand them after the "
            "cache (expand_kv), the form rkv_flex serves (transformers 5.24 on)"
        )
    if all(mode == "reuse" for mode in getattr(text, "kv_sharing_modes", None) or [None]):
        raise ValueError(
            f"every layer of this {model_type} reads keys and values another model computes (an assistant model): "
            "it has no cache of its own to compress"
        )
    bidirectional = getattr(text, "use_bidirectional_attention", None)
    if bidirectional is True or bidirectional == "all":  # "vision": only image tokens of the multimodal model
        raise ValueError(
            f"{model_type} with use_bidirectional_attention={bidirectional!r} attends to later tokens, which a "
            "decoding cache cannot serve; rkv_flex refuses it"
        )
    if type(model).__name__.endswith("ForConditionalGeneration"):
        raise ValueError(
            f"{type(model).__name__} is a multimodal model, whose prompts carry image features that rkv_flex does not "
            "read in pieces; load its text model with AutoModelForCausalLM"
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
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if latent_config(text) is not None and config.allocation == "adaptive":
        raise ValueError(
            "allocation='adaptive' moves budget between KV heads; a latent (MLA) layer has one, which every query "
            "head reads (use allocation='uniform')"
        )
    config, ropes, statistics = resolve_policy(model, config)
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    record = PatchRecord(config, previous, ropes=ropes, statistics=statistics)
    for module in model.modules():  # KV-sharing attention learns, per forward, which layer's slots it reads
        if getattr(module, "is_kv_shared_layer", False):
            record.hooks.append(module.register_forward_pre_hook(_name_the_source, with_kwargs=True))
        if is_latent(module):  # MLA attends its latents: no per-head keys and values expanded
            module.expand_kv = types.MethodType(latent_inputs, module)
            record.latent_modules.append(module)
    model.__dict__[_PATCH_ATTR] = record
    model.__dict__["generate"] = PatchedGenerate(model)
    return model


def resolve_policy(model: Any, config: RKVConfig) -> tuple[RKVConfig, list[Rope | None] | None, dict | None]:
    """``config`` with its policy concrete, and what a policy tracking queries needs of the model (its layers' RoPE
    and any calibrated statistics): ``"auto"`` is TriAttention where the model's RoPE reads as frequencies per pair,
    and R-KV where it does not (interleaved pairs, latent attention, no rotary module)."""
    if config.policy != "auto":
        return config, *query_statistics_inputs(model, config)
    try:
        chosen = config.resolved(triattention_serves=True)
        return chosen, *query_statistics_inputs(model, chosen)
    except RopeUnreadable:
        return config.resolved(triattention_serves=False), None, None


def query_statistics_inputs(model: Any, config: RKVConfig) -> tuple[list[Rope | None] | None, dict | None]:
    """For a policy that tracks queries (TriAttention): each layer's RoPE and, if a calibration file is given, its
    statistics, both checked against the model before any work."""
    if not make_policy(config).tracks_queries:
        return None, None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if latent_config(text) is not None:
        raise RopeUnreadable(
            f"{config.policy!r} scores keys from their RoPE frequencies over a whole head; a latent (MLA) key rotates "
            "only its last qk_rope_head_dim channels. Use another policy (R-KV, the default, scores latents)"
        )
    kinds = layer_kinds(model)
    head_dims = layer_shapes(text)[1]
    ropes = model_ropes(model, head_dims, kinds)
    if config.statistics is None:
        return ropes, None
    if (getattr(model, "tp_size", None) or 1) > 1:
        raise ValueError("calibrated TriAttention statistics are per model head; under tensor parallelism use online")
    from .calibration import load_statistics

    keyed = [index for index, spec in enumerate(layer_specs(model)) if isinstance(spec, LayerSpec)]
    expected = {index: (text.num_attention_heads, head_dims[index]) for index in keyed}
    return ropes, load_statistics(config.statistics, model, expected)


def _name_the_source(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before a KV-sharing attention runs: it receives the cache layer whose kept set it reads (transformers hands it
    that layer's keys and values, but not what the cache knows of them)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, RKVCache):
        layer = cache.layers[module.layer_idx]
        kwargs = {**kwargs, "rkv_source": layer.source if isinstance(layer, SharedKVLayer) else None}
    return args, kwargs


def unpatch_model(model: Any) -> Any:
    """Undo :func:`patch_model`: stock attention implementation and ``generate`` again, and every cache the model
    held released. Returns the same model."""
    record = patch_record(model)
    model.set_attn_implementation(record.previous_attention)
    del model.__dict__["generate"]
    del model.__dict__[_PATCH_ATTR]
    record.release()
    return model


ATTENTION_KINDS = ("full_attention", "sliding_attention", "hybrid")  # hybrid: attention beside a Mamba mixer
STATE_KINDS = ("linear_attention", "conv", "mamba", "mlp", "moe")  # a constant-size state, or none at all


def layer_kinds(model: Any) -> list[str]:
    """Each decoder layer's kind, as the config names it (a config without ``layer_types`` is all attention)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    unknown = sorted(set(kinds) - set(ATTENTION_KINDS) - set(STATE_KINDS))
    if unknown:
        raise ValueError(
            f"{model.config.model_type} has layers of kind {unknown}, which rkv_flex does not know: it serves "
            f"attention layers {ATTENTION_KINDS} and leaves constant-size state layers {STATE_KINDS} to transformers"
        )
    if not set(kinds) & set(ATTENTION_KINDS):
        raise ValueError(f"this {model.config.model_type} has no attention layer: its state is constant-size already")
    return kinds


def layer_specs(
    model: Any, ropes: list[Rope | None] | None = None, statistics: dict | None = None
) -> list[LayerSpec | SharesKV | None]:
    """Per decoder layer, what the slot cache must know: query heads per KV head, sliding window, sinks (and, for
    TriAttention, its RoPE and any calibrated statistics); the layer whose keys a KV-sharing layer reads; None for a
    layer whose state is constant-size (linear attention, Mamba, convolution), which transformers' layer keeps."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:  # SmolLM3 and Qwen keep the field but switch it off
        window = None
    kinds = layer_kinds(model)
    if getattr(text, "layer_types", None) is None:  # one window (or none) for every layer
        kinds = ["sliding_attention" if window is not None else "full_attention"] * len(kinds)
    sinks = ARCHITECTURES.get(model.config.model_type, Architecture()).sinks
    windows = {"full_attention": None, "sliding_attention": window, "hybrid": None}
    kv_heads, _ = layer_shapes(text)
    sources = kv_sources(text, kinds)
    latent = latent_config(text)
    rank = None if latent is None else latent[0]  # MLA: the latent's channels, the value's share of the key
    specs: list[LayerSpec | SharesKV | None] = []
    for index, kind in enumerate(kinds):
        if index in sources:
            specs.append(SharesKV(sources[index]))
        elif kind in windows:
            group = text.num_attention_heads // kv_heads[index]
            rope = None if ropes is None else ropes[index]
            calibrated = None if statistics is None else statistics[index]
            specs.append(LayerSpec(group, windows[kind], sinks, rope, calibrated, rank, with_state=kind == "hybrid"))
        else:
            specs.append(None)
    return specs


def layer_shapes(text: Any) -> tuple[list[int], list[int]]:
    """Each layer's KV heads and key size (Gemma 4's full layers have their own; configs that allow it say so per
    layer). A latent (MLA) layer is one head whose key is its latent and rope key."""
    latent = latent_config(text)
    if latent is not None:
        return [1] * text.num_hidden_layers, [sum(latent)] * text.num_hidden_layers
    per_layer = getattr(text, "per_layer_config", None)
    configs = [text if per_layer is None else per_layer[index] for index in range(text.num_hidden_layers)]
    default_dim = text.hidden_size // text.num_attention_heads
    return [c.num_key_value_heads for c in configs], [getattr(c, "head_dim", None) or default_dim for c in configs]


def stock_kv_bytes(model: Any, tokens: int) -> int:
    """Bytes of K and V transformers' own cache holds for one row after ``tokens`` tokens: every layer that
    computes keys holds them all, a sliding layer its window (a KV-sharing or constant-state layer none)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads, head_dims = layer_shapes(text)
    element = torch.finfo(model.dtype).bits // 8
    total = 0
    for spec, heads, dim in zip(layer_specs(model), kv_heads, head_dims, strict=True):
        if isinstance(spec, LayerSpec):
            held = tokens if spec.sliding_window is None else min(tokens, spec.sliding_window)
            per_token = dim if spec.latent is not None else 2 * heads * dim  # MLA: latent and rope key, once
            total += per_token * element * held
    return total


def kv_sources(text: Any, kinds: list[str]) -> dict[int, int]:
    """KV sharing (Gemma 3n, Gemma 4): each reading layer's source, the last earlier layer of its kind that stores
    its keys for readers."""
    modes = getattr(text, "kv_sharing_modes", None) or [None] * len(kinds)
    stores = {kinds[index]: index for index, mode in enumerate(modes) if mode == "store"}
    return {index: stores[kinds[index]] for index, mode in enumerate(modes) if mode == "reuse"}


BATCH_DEPENDENT_ROPE = ("longrope", "dynamic")  # transformers picks their frequencies from the batch's largest position


def batch_dependent_rope(model: Any) -> str | None:
    """The model's RoPE type if its frequencies depend on the largest position in the batch, else None."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    parameters = getattr(text, "rope_parameters", None) or {}
    per_layer_type = [p for p in parameters.values() if isinstance(p, dict)]
    for entry in per_layer_type or [parameters]:
        rope = entry.get("rope_type", "default")
        if any(kind in rope for kind in BATCH_DEPENDENT_ROPE):
            return rope
    return None


def longrope_switch(model: Any) -> int | None:
    """Positions a LongRoPE model reads with its short factors (``original_max_position_embeddings``), or None.

    Past them transformers switches to the long factors, and Phi-3's generate then reads the whole sequence again
    (keys cached with the short factors would not match the new queries). rkv_flex keeps only the compressed cache
    and cannot read evicted tokens again, so it refuses generations that would cross the switch."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    parameters = getattr(text, "rope_parameters", None) or {}
    per_layer_type = [p for p in parameters.values() if isinstance(p, dict)]
    for entry in per_layer_type or [parameters]:
        if entry.get("rope_type") == "longrope":
            switch = entry.get("original_max_position_embeddings")
            return switch or getattr(text, "original_max_position_embeddings", None)
    return None


def check_length(model: Any, total: int, what: str) -> None:
    """Refuse a generation of ``total`` tokens (prompt + new) that would cross a LongRoPE switch."""
    switch = longrope_switch(model)
    if switch is not None and total > switch:
        raise ValueError(
            f"{what} reaches {total} tokens, past the {switch} positions this model's LongRoPE reads with its short "
            "factors; beyond them transformers reads the whole sequence again with the long factors, which a "
            f"compressed cache cannot do. Keep prompt + max_new_tokens <= {switch}"
        )


def make_cache(model: Any) -> RKVCache:
    """A fresh slot cache for a patched model, for callers that run ``model(...)`` themselves or keep a
    conversation's cache across ``generate`` calls."""
    record = patch_record(model)
    cache_class = RKVCache
    if model.config.model_type == "minimax":  # its model accepts only its own cache class
        from .lightning import LightningCache as cache_class
    return cache_class(record.config, layer_specs(model, record.ropes, record.statistics), record.kernels)


def check_prompt(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    """Refuse prompts without tokens, or right-padded, before any work starts."""
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] == 0:
        raise ValueError("the prompt has no tokens (input_ids has length 0)")
    if attention_mask is not None and attention_mask.ndim == 2:
        empty = (attention_mask.sum(dim=-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt rows {empty} have no tokens (their attention_mask is all zeros)")
        right = (attention_mask[:, 1:] < attention_mask[:, :-1]).any(dim=-1).nonzero().flatten().tolist()
        if right:
            raise ValueError(
                f"prompt rows {right} are right-padded (a 0 in attention_mask after a 1); pad on the left "
                "(tokenizer.padding_side = 'left')"
            )


class CompactionScheduler(LogitsProcessor):
    """Plans each next forward on the host between transformers' forwards.

    transformers calls logits processors eagerly after every forward, also when it compiles the forward itself
    (``compile_config``, or automatically on CUDA); a compiled forward cannot plan its own compaction.
    """

    def __init__(self, cache: RKVCache, compiled_steps: bool = False):
        self.cache, self.compiled_steps = cache, compiled_steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.compiled_steps:  # after the prefill, before transformers traces the first decoding step
            self.cache.choose_decode_kernels()
            self.compiled_steps = False
        self.cache.begin_step(1)
        return scores


def transformers_compiles(model: Any, kwargs: dict, generation_config: Any) -> bool:
    """Whether transformers' ``generate`` will compile the decoding forward (its rule, for a compileable cache: on an
    accelerator, or on any device when the compile_config says so, unless compilation is disabled)."""
    if kwargs.get("disable_compile", generation_config.disable_compile):
        return False
    compile_config = kwargs.get("compile_config", generation_config.compile_config)
    everywhere = compile_config is not None and getattr(compile_config, "_compile_all_devices", False)
    return model.device.type != "cpu" or bool(everywhere)


class PatchedGenerate:
    """``generate`` of a patched model: the stock one, with an RKVCache unless the caller passed one, and a long
    prompt fed in ``prefill_chunk`` pieces first. Holds the model weakly (no reference cycle)."""

    def __init__(self, model: Any):
        self.model = weakref.ref(model)

    def __call__(self, *args: Any, **kwargs: Any):
        model = self.model()
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
        # transformers itself drops a model's default "hybrid" (Gemma's hub configs set it); anything else conflicts
        if implementation is not None and (implementation != "hybrid" or "cache_implementation" in kwargs):
            raise ValueError(
                f"cache_implementation={implementation!r} conflicts with rkv_flex, which supplies its own cache"
            )
        input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        attention_mask = kwargs.get("attention_mask")
        check_prompt(input_ids, attention_mask)
        if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2:
            new = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
            total = (
                input_ids.shape[1] + new if new is not None else kwargs.get("max_length", generation_config.max_length)
            )
            check_length(model, total, "this generation")
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        compiles = transformers_compiles(model, kwargs, generation_config)
        if cache is not None:
            return self._generate(model, record.config, cache, input_ids, attention_mask, compiles, args, kwargs)
        with record.lock:  # the pooled cache serves one call at a time
            cache = self._pooled_cache(model, record, input_ids)
            kwargs["cache"] = cache
            return self._generate(model, record.config, cache, input_ids, attention_mask, compiles, args, kwargs)

    @staticmethod
    def _pooled_cache(model: Any, record: PatchRecord, input_ids: torch.Tensor | None) -> RKVCache:
        batch = 1 if input_ids is None else input_ids.shape[0]
        key = (batch, model.dtype, model.device)
        if key not in record.caches:
            record.caches[key] = make_cache(model)
        cache = record.caches[key]
        cache.reset()
        return cache

    @staticmethod
    def _generate(model, config, cache, input_ids, attention_mask, compiles, args, kwargs):
        if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2:
            cache.require_batch(input_ids.shape[0])
            seen = cache.get_seq_length()
            if seen > input_ids.shape[1]:
                raise ValueError(
                    f"the cache has seen {seen} tokens but input_ids holds {input_ids.shape[1]}: pass the whole "
                    "conversation so far (transformers' convention for continuing from a cache)"
                )
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            pieces = prompt_pieces(input_ids.shape[1] - seen, config, padded_columns(mask[:, seen:]))
            if len(pieces) > 1:  # all but the last piece; generate reads the last and decodes on
                feed(model, cache, input_ids, mask, seen, pieces[:-1])
        kwargs["logits_processor"] = LogitsProcessorList(
            [*(kwargs.get("logits_processor") or []), CompactionScheduler(cache, compiles)]
        )
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            cache.cancel_plan()
