"""CUDA-graph checks, run by bench/gpu_check.sh on a lent GPU (skipped without one).

The references are twin models patched with ``attention="sdpa"``: the dense-mask path, which never compiles (on
CUDA a patched ``model.generate`` auto-compiles, so it cannot serve as the eager reference).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from conftest import padded_prompt, teacher_forced, tiny_model
from torch._inductor import cudagraph_trees

from rkv_flex import Engine, generate, patch_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def cuda_graphs_or_error():
    """A CUDA graph that would be skipped fails the test instead."""
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        yield


# (query heads, KV heads, head dim, capacity as budget + buffer): R1-Distill-Llama-8B's heads; GQA 7 as in
# R1-Distill-Qwen-7B (no flex decoding kernel unless the group is folded); a capacity off the 128-slot block.
SHAPES = [(32, 8, 128, (112, 16)), (28, 4, 128, (112, 16)), (8, 2, 64, (536, 64))]


def twins(arch: str, heads: int, kv_heads: int, head_dim: int, slots: tuple[int, int], dtype):
    """The same random model patched twice: compiled flex (CUDA graphs) and the dense SDPA reference."""
    budget, buffer = slots
    models = []
    for attention in ("flex", "sdpa"):
        model = tiny_model(arch, heads, kv_heads, seed=1, head_dim=head_dim, hidden_size=heads * head_dim)
        models.append(patch_model(model.cuda().to(dtype), budget=budget, buffer=buffer, window=8, attention=attention))
    return models


def cuda_prompt(batch, length, pads, seed):
    ids, mask = padded_prompt(batch, length, pads, seed=seed)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("heads,kv_heads,head_dim,slots", SHAPES)
def test_fp32_cuda_graph_decoding_equals_the_dense_reference_through_compactions(heads, kv_heads, head_dim, slots):
    compiled, reference = twins("llama", heads, kv_heads, head_dim, slots, torch.float32)
    ids, mask = cuda_prompt(2, 20, [0, 6], 1)
    new = 2 * sum(slots)  # at least two compactions per row
    out = generate(compiled, ids, mask, max_new_tokens=new)
    rows = [row[keep.bool()][None] for row, keep in zip(ids, mask, strict=True)]
    for row, prompt in enumerate(rows):
        alone = reference.generate(input_ids=prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert torch.equal(out[row, 20:], alone[0, prompt.shape[1] :])


@pytest.mark.parametrize("heads,kv_heads,head_dim,slots", SHAPES[:2])
def test_bf16_cuda_graph_logits_follow_the_dense_reference(heads, kv_heads, head_dim, slots):
    """Teacher-forced on the compiled loop's own bf16 output: the dense reference picks the same tokens at (nearly)
    every position, and its logits stay within 0.1 of the compiled path's where both run (stated tolerance for
    bf16 on these random models, whose logits span about +-3)."""
    compiled, reference = twins("qwen2", heads, kv_heads, head_dim, slots, torch.bfloat16)
    ids, mask = cuda_prompt(1, 30, [0], 2)
    new = 2 * sum(slots)
    out = generate(compiled, ids, mask, max_new_tokens=new)
    logits, cache = teacher_forced(reference, ids, mask, out)
    assert cache.compactions >= 2
    assert (logits.argmax(-1) == out[:, 30:]).float().mean() > 0.97
    compiled_logits, _ = teacher_forced(compiled, ids, mask, out)
    assert (compiled_logits.float() - logits.float()).abs().max() < 0.1


def test_one_recording_per_graph_and_one_replay_per_call():
    """After a warm-up, two more prompts record nothing new and replay exactly the graph calls made (two per step,
    one per compaction), with no skipped CUDA graph and no recompile."""
    model, _ = twins("llama", 8, 2, 64, (112, 16), torch.float32)
    recordings, replays = [], []
    record, run = cudagraph_trees.CUDAGraphNode._record, cudagraph_trees.CUDAGraphNode.run

    def counted_record(node, *args, **kwargs):
        recordings.append(node)
        return record(node, *args, **kwargs)

    def counted_run(node, *args, **kwargs):
        replays.append(node)
        return run(node, *args, **kwargs)

    with Engine(model, batch_size=2) as engine:
        compactions = []
        compactor = engine.cache.compactor
        engine.cache.compactor = lambda *args: (compactions.append(1), compactor(*args))[1]
        torch._dynamo.utils.counters.clear()
        engine.generate([[3] * 20, [4] * 33], max_new_tokens=300)  # warm-up: records every graph
        assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
        steps, compactions[:] = engine.steps_run, []
        with (
            mock.patch.object(cudagraph_trees.CUDAGraphNode, "_record", counted_record),
            mock.patch.object(cudagraph_trees.CUDAGraphNode, "run", counted_run),
            torch._dynamo.config.patch(error_on_recompile=True),
        ):
            engine.generate([[5] * 25, [6] * 40], max_new_tokens=300)
        steps = engine.steps_run - steps
    assert recordings == []
    assert len(replays) == 2 * steps + len(compactions)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
