"""CUDA-graph checks (skipped without a GPU; run by bench/gpu_check.sh on a lent device)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import padded_prompt, tiny_model

from rkv_flex import generate, patch_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model():
    """GQA 4 (a power of two) and head dim 64: eligible for the GPU flex-decoding kernel."""
    model = tiny_model("llama", 8, 2, seed=1, head_dim=64, hidden_size=512).cuda()
    return patch_model(model, budget=112, buffer=16, window=8)


def prompt(batch, length, pads, seed):
    ids, mask = padded_prompt(batch, length, pads, seed=seed)
    return ids.cuda(), mask.cuda()


def test_cuda_graph_decoding_equals_eager_generate(model):
    ids, mask = prompt(2, 20, [0, 6], 1)
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=200, min_new_tokens=200, do_sample=False)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=200), eager)


def test_cuda_graphs_replay_without_skips_or_recompiles(model):
    ids, mask = prompt(2, 20, [0, 6], 2)
    other, other_mask = prompt(2, 33, [3, 0], 3)
    generate(model, ids, mask, max_new_tokens=160)  # warm-up: captures decode and compaction
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(model, ids, mask, max_new_tokens=400)
        generate(model, other, other_mask, max_new_tokens=400)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


def test_bfloat16_decodes_within_capacity(model):
    bf16 = patch_model(
        tiny_model("qwen2", 8, 2, seed=2, head_dim=64, hidden_size=512).cuda().to(torch.bfloat16), budget=112, buffer=16
    )
    ids, mask = prompt(3, 40, [0, 5, 9], 4)
    out = generate(bf16, ids, mask, max_new_tokens=300)
    assert out.shape == (3, 340)
    from rkv_flex.decode import last_cache

    cache = last_cache(bf16)
    assert cache.compactions >= 1 and all(layer.keys.shape[2] == 128 for layer in cache.layers)
