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

# Many tiny shapes compile their own flex graph in one test process.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 512

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
VOCAB = 256
HEAD_DIM = 16


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


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, loaded once."""
    from rkv_flex.bundled import load_model

    return load_model()
