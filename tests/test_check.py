"""rkv_flex.check: measures on the user's own model whether compression runs (bytes, compactions), how close it stays
to the full cache, and whether the compiled step equals the eager one; it can say no."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

from rkv_flex import Policy, SlotState, check, is_patched, patch_model
from rkv_flex.cli import main

SETTINGS = dict(budget=16, buffer=8, window=4)


def test_an_unpatched_model_is_checked_with_the_settings_given_and_left_unpatched(capsys):
    model = tiny_model("llama", 6, 2, seed=21)
    report = check(model, **SETTINGS)
    assert not is_patched(model)
    assert report.compressing and report.compactions >= 2
    assert report.slots_held == 24 and report.tokens > 24
    assert report.kv_bytes_held < report.kv_bytes_full
    assert 0.0 <= report.top1_agreement <= 1.0 and report.kl >= 0.0
    assert report.compiled_steps == 2 * SETTINGS["buffer"] and report.compiled_equals_eager
    assert report.compiled_max_logit_difference < 1e-3
    assert set(report.decode_kernels) <= {"flex", "sdpa"} and len(report.decode_kernels) == 2
    printed = capsys.readouterr().out
    assert "compression running:   yes" in printed and "compiled vs eager:     equal" in printed
    assert json.loads(json.dumps(report.as_dict(), default=str))["compressing"] is True


def test_a_patched_model_is_checked_with_its_own_settings_and_stays_patched():
    model = patch_model(tiny_model("qwen2", 4, 2, seed=22), policy="snapkv", **SETTINGS)
    report = check(model, verbose=False)
    assert is_patched(model) and report.settings["policy"] == "snapkv"
    with pytest.raises(ValueError, match="this model is patched: check\\(\\) uses its settings"):
        check(model, budget=32)
    with pytest.raises(ValueError, match="text needs the model's tokenizer"):
        check(tiny_model("llama", seed=1), text="hello", **SETTINGS)


@dataclass(frozen=True)
class TracedDiffers(Policy):
    """A policy whose traced and eager scores disagree (newest kept when compiled, oldest when eager)."""

    def __call__(self, state: SlotState) -> torch.Tensor:
        order = state.pos.float()
        return order if torch.compiler.is_compiling() else -order


def test_the_check_reports_a_compiled_step_that_differs_from_the_eager_one():
    report = check(tiny_model("llama", 6, 2, seed=23), policy=TracedDiffers(), verbose=False, **SETTINGS)
    assert report.compressing
    assert not report.compiled_equals_eager and report.compiled_top1_disagreements > 0


@pytest.mark.slow
def test_the_check_command_on_a_local_model_directory(tmp_path, capsys, bundled):
    """``rkv-flex check --model DIR`` on a tiny random Llama saved beside the bundled tokenizer (the bundled model
    itself compiles for about a minute here; its timing is in the README)."""
    _, tokenizer = bundled
    model = tiny_model("llama", 6, 2, seed=24, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "check.json"
    options = ["--budget", "16", "--buffer", "8", "--window", "4", "--json", str(out)]
    assert main(["check", "--model", str(tmp_path / "model"), *options]) == 0
    report = json.loads(out.read_text())
    assert report["compressing"] and report["compiled_equals_eager"] and report["prompt_tokens"] > 20
    assert "compression running:   yes" in capsys.readouterr().out
