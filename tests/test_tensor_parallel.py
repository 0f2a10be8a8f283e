"""Tensor parallelism on transformers' tp_plan: two ranks under torchrun (gloo, CPU), each scoring and compacting its
own KV heads, must decode exactly what one process decodes, hold half the KV bytes, and keep, head for head, what the
single process keeps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tp_worker import NEW, PROMPT

from rkv_flex import generate, make_cache, patch_model

WORKER = Path(__file__).parent / "tp_worker.py"


def single_process(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = patch_model(AutoModelForCausalLM.from_pretrained(model_dir).eval(), budget=12, buffer=6, window=4)
    cache = make_cache(model)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, cache=cache)
    sampled = generate(model, ids, max_new_tokens=NEW, do_sample=True, temperature=1.2, seed=3, compile=False)
    held = [layer.slots.pos.masked_fill(~layer.slots.valid, -1) for layer in cache.layers]
    return {"tokens": tokens.tolist(), "kv_bytes": cache.kv_bytes, "kept": held, "sampled": sampled.tolist()}


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun is not installed",
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_decode_like_one_process_with_half_the_kv_bytes(arch, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model(arch, heads=4, kv_heads=2, seed=4).save_pretrained(model_dir)
    reference = single_process(model_dir)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(WORKER), str(model_dir), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the two-rank run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    errors = {f"rank {rank['rank']} {key}": value for rank in ranks for key, value in rank.items() if "error" in key}
    assert not errors, errors
    assert reference["kept"] and ranks[0]["compactions"] >= 2
    for rank in ranks:
        assert rank["tp_size"] == 2
        assert rank["tokens"] == reference["tokens"]  # the model's own generate, eager, with eviction
        assert rank["kv_bytes"] * 2 == reference["kv_bytes"]
        for layer, held in enumerate(rank["kept"]):  # this rank's KV head is head `rank` of the whole model
            assert held[0][0] == reference["kept"][layer][0, rank["rank"]].tolist()
        assert rank["sampled"] == reference["sampled"]  # the same seed gives the same tokens on every rank
        assert rank["compiled"] == reference["tokens"]  # the compiled loop traces the TP model's collectives


def test_a_split_that_breaks_a_kv_head_is_refused():
    model = tiny_model("llama", heads=6, kv_heads=3)
    model._tp_size = 2
    with pytest.raises(ValueError, match="split over 2 tensor-parallel ranks, which does not divide its 3 KV heads"):
        patch_model(model, budget=16)
