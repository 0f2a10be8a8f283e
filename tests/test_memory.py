"""Peak memory is set by the budget and the chunk, not the prompt: proven by sizes (the largest tensor any operation
produces during a long prefill), not by timing.

A dispatch mode sees every eager operation, so this runs the dense SDPA reference path, which stages the same slots
and chunks as the flex path (under a dispatch mode torch.compile steps aside and flex would run its unfused eager
form, which materialises scores by design). The flex path's peak process memory is measured by
bench/long_context.py."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from rkv_flex import patch_model


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any dispatched operation returns."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def largest_during_generate(model, prompt_length: int) -> int:
    ids = torch.randint(2, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(prompt_length))
    with torch.no_grad(), LargestTensor() as mode:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    return mode.bytes


@pytest.mark.parametrize("policy", ["rkv", "h2o"])
def test_the_largest_tensor_of_a_long_prefill_does_not_grow_with_the_prompt(policy):
    model = tiny_model("llama", 4, 2, seed=1, max_position_embeddings=16384)
    patch_model(model, budget=64, buffer=64, prefill_chunk=256, attention="sdpa", policy=policy)
    largest = {length: largest_during_generate(model, length) for length in (1024, 4096, 8192)}
    assert largest[1024] == largest[4096] == largest[8192], largest


def test_the_stock_model_s_largest_tensor_grows_with_the_prompt():
    """The measure can fail: without rkv_flex, the largest tensor of the prefill grows with the prompt."""
    model = tiny_model("llama", 4, 2, seed=1, max_position_embeddings=16384)
    small, large = largest_during_generate(model, 1024), largest_during_generate(model, 4096)
    assert large >= 4 * small
