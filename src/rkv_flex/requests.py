"""Requests for the engine: prompts and per-request options, merged with the model's generation defaults the way
``model.generate`` merges them, validated before any work starts.

Options come as one value for every prompt or a list with one value per prompt (``eos_token_id``: an id or a list
of ids for every prompt, or a list with one id list, or None, per prompt). A field of the model's
``generation_config`` (or an option) that rkv_flex does not implement, set to anything but its neutral value, is
refused with its name: it would change the output, so it is never ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

from .sampling import SamplingParams

# What transformers applies when neither the model nor the caller sets a field.
_DEFAULTS = GenerationConfig._get_default_generation_params()
# Fields rkv_flex implements, and fields that do not change which tokens are generated.
SUPPORTED = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "eos_token_id", "pad_token_id")
INERT = frozenset(
    {
        "max_length",  # used to derive max_new_tokens when that is unset, as transformers does
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",  # rkv_flex supplies its own cache
        "transformers_version",
        "_from_model_config",
        "output_scores",
        "output_attentions",
        "output_hidden_states",
        "output_logits",
        "return_dict_in_generate",
    }
)
MAX_STOP_IDS = 8  # end-of-sequence ids per request (the engine holds them in a fixed-size tensor)


@dataclass(frozen=True)
class Request:
    """One prompt and how to continue it."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    pad_id: int


def unsupported_fields(generation_config: GenerationConfig) -> list[str]:
    """Fields of ``generation_config`` set to a value that changes generation and that rkv_flex does not implement."""
    found = []
    for name, value in generation_config.to_diff_dict().items():
        if name in SUPPORTED or name in INERT or value is None:
            continue
        if name in _DEFAULTS and value == _DEFAULTS[name]:
            continue
        found.append(name)
    return sorted(found)


def _per_prompt(name: str, value: Any, count: int) -> list[Any]:
    if isinstance(value, (list, tuple)) and name != "eos_token_id":
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} values for {count} prompts; give one value or one per prompt")
        return list(value)
    per_prompt = isinstance(value, (list, tuple)) and any(v is None or isinstance(v, (list, tuple)) for v in value)
    if name == "eos_token_id" and per_prompt:  # [[ids...] or None, ...]: one entry per prompt
        if len(value) != count:
            raise ValueError(f"eos_token_id has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count


def _stop_ids(value: Any) -> tuple[int, ...]:
    ids = () if value is None else (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {value!r}")
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} eos_token_id values per request, got {len(ids)}")
    return ids


def _prompts(prompts: Any) -> list[tuple[int, ...]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a non-empty list of token-id lists")
    result = []
    for index, prompt in enumerate(prompts):
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise TypeError(f"prompt {index} must be a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"prompt {index} has no tokens")
        result.append(tuple(prompt))
    return result


def build_requests(generation_config: GenerationConfig, prompts: Sequence[Any], **options: Any) -> list[Request]:
    """One :class:`Request` per prompt: ``options`` over ``generation_config`` over transformers' defaults."""
    unknown = sorted(set(options) - set(SUPPORTED))
    if unknown:
        raise TypeError(f"rkv_flex does not implement the generation option(s) {unknown}; supported: {SUPPORTED}")
    refused = unsupported_fields(generation_config)
    if refused:
        raise ValueError(
            f"the model's generation_config sets {refused}, which rkv_flex does not implement and which would change "
            "the output; set them to their neutral values (or None) in model.generation_config first"
        )
    prompts = _prompts(prompts)
    count = len(prompts)

    def option(name: str, default: Any) -> list[Any]:
        value = options.get(name)
        if value is None:
            value = getattr(generation_config, name, None)
        if value is None:
            value = default
        return _per_prompt(name, value, count)

    max_new = option("max_new_tokens", None)
    max_length = generation_config.max_length if generation_config.max_length is not None else _DEFAULTS["max_length"]
    requests = []
    for index, prompt in enumerate(prompts):
        new = max_new[index] if max_new[index] is not None else max_length - len(prompt)
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {new!r} for prompt {index}")
        stops = _stop_ids(option("eos_token_id", None)[index])
        pad = option("pad_token_id", None)[index]
        pad = pad if pad is not None else (stops[0] if stops else 0)
        sampling = SamplingParams(
            do_sample=bool(option("do_sample", _DEFAULTS["do_sample"])[index]),
            temperature=float(option("temperature", _DEFAULTS["temperature"])[index]),
            top_p=float(option("top_p", _DEFAULTS["top_p"])[index]),
            top_k=int(option("top_k", _DEFAULTS["top_k"])[index]),
            seed=int(option("seed", 0)[index]),
        )
        requests.append(Request(prompt, new, sampling, stops, int(pad)))
    return requests
