"""Shared helpers: tiny random models of each supported architecture, padded prompts, the bundled model."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
VOCAB = 256
HEAD_DIM = 16


def tiny_of_type(model_type: str, fields: dict, seed: int):
    """A random model of any transformers type from its config fields, stock sdpa, greedy without an end."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def assert_compiled_equals_eager(model, ids, mask, new_tokens: int = 24):
    """The patched model's own (eager) generate and the compiled loop give the same tokens; returns the eager run's
    cache for the caller's checks on it."""
    from rkv_flex import generate, make_cache

    cache = make_cache(model)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache=cache)
    eager = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[]), eager)
    return cache


def assert_engine_equals_alone(model, prompt_lengths=(5, 23, 11, 30), new_tokens=(20, 9, 26, 14), seed: int = 3):
    """Random prompts (some beyond the slots) through an engine of two rows, refilled as requests finish: each
    request's tokens equal the prompt generated alone."""
    import random

    from rkv_flex import Engine, generate

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(length)] for length in prompt_lengths]
    alone = [
        generate(model, torch.tensor([p]), max_new_tokens=n, eos_token_id=[])[0, len(p) :].tolist()
        for p, n in zip(prompts, new_tokens, strict=True)
    ]
    with Engine(model, batch_size=2) as engine:
        assert engine.generate(prompts, max_new_tokens=list(new_tokens), eos_token_id=[]) == alone


def tiny_model(arch: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0, **extra):
    """A random-initialised model with stock sdpa attention; weights scaled up so greedy choices are not ties."""
    config_class, model_class = ARCHITECTURES[arch]
    options = dict(
        hidden_size=HEAD_DIM * heads,
        head_dim=HEAD_DIM,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    if arch == "mistral":
        options["sliding_window"] = None
    options.update(extra)
    torch.manual_seed(seed)
    model = model_class(config_class(**options)).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


def padded_prompt(batch: int, length: int, pads: list[int] | None = None, seed: int = 0):
    """Left-padded random prompts: row i has ``pads[i]`` padding tokens before its ``length - pads[i]`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads or [0] * batch):
        input_ids[row, :pad] = 0
        attention_mask[row, :pad] = 0
    return input_ids, attention_mask


def greedy(model, input_ids, attention_mask, new_tokens: int, **options):
    """Greedy generate returning (tokens, per-step logits [steps, B, V])."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **options,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_cache():
    """Each test module starts with an empty dynamo cache, as a fresh process would: dynamo's default recompile
    limits then apply to what one module compiles (rkv_flex raises GraphLimitError past them, never falls back)."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, loaded once."""
    from rkv_flex.tools.bundled import load_model

    return load_model()


def teacher_forced(model, ids, mask, sequence):
    """(logits [B, new, V], cache) of ``model`` (patched) at every generated position of ``sequence``
    [B, prompt + new], fed teacher-forced through a fresh cache with the same compaction schedule as decoding."""
    from rkv_flex import make_cache
    from rkv_flex.tools.replay import replay

    prompt = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(sequence[:, prompt:])], dim=1)
    cache = make_cache(model)
    logits = [chunk for _, chunk in replay(model, cache, sequence[:, :-1], full_mask[:, :-1], prompt)]
    return torch.cat(logits, dim=1), cache
