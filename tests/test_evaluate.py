"""Answer extraction and matching for rkv-flex eval, and the command itself on a few items."""

from __future__ import annotations

import json

import pytest

from rkv_flex.cli import main
from rkv_flex.tools.bundled import chat_batch, load_problems
from rkv_flex.tools.evaluate import extract_answer, is_correct, last_boxed


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so the total is \\boxed{18}.", "18"),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)} done", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("She makes 9 * 2 = $18 every day, so 18.", "18"),
        ("1,234 apples and then 5,678.5 pears", "5,678.5"),
        ("no digits here", None),
        ("unclosed \\boxed{12", "12"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "predicted,reference,correct",
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("$1,200", "1200", True),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
        ("-\\frac{1}{3}", "-1/3", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("17", "18", False),
        (None, "18", False),
        ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ],
)
def test_is_correct(predicted, reference, correct):
    assert is_correct(predicted, reference) is correct


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("nothing") is None


def test_reference_answers_load_for_both_datasets():
    gsm8k, math500 = load_problems("gsm8k", 3), load_problems("math500", 3)
    assert [p.answer for p in gsm8k] == ["18", "3", "70000"]
    assert len(math500) == 3 and all(p.answer for p in math500)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_problems("aime", 1)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_problems("gsm8k", 0)


@pytest.mark.slow
def test_eval_command_on_the_bundled_model(tmp_path, capsys, bundled):
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--limit",
            "2",
            "--policies",
            "full",
            "rkv",
            "--budgets",
            "16",
            "--buffer",
            "16",
            "--max-new-tokens",
            "48",
            "--batch",
            "2",
            "--no-compile",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["policy"], row["total"]) for row in rows] == [("full", 2), ("rkv", 2)]
    for row in rows:
        assert row["correct"] == sum(answer["correct"] for answer in row["answers"])
        assert row["accuracy"] == row["correct"] / 2
    # the full cache answers exactly what the stock model answers
    model, tokenizer = bundled
    problems = load_problems("gsm8k", 2)
    inputs = chat_batch(tokenizer, [p.question for p in problems])
    stock = model.generate(**inputs, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(stock[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert [answer["predicted"] for answer in rows[0]["answers"]] == [extract_answer(text) for text in texts]
    printed = capsys.readouterr()
    assert "| rkv | 16 |" in printed.out
    # progress while it runs: one line per problem answered, per setting
    assert "[full -] 2/2 problems" in printed.err and "[rkv 16] 1/2 problems" in printed.err
    assert "accuracy so far" in printed.err and "tokens/s" in printed.err


def test_help_lists_the_commands_one_per_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for command in ("check", "generate", "eval", "bench"):
        assert sum(line.strip().startswith(command + " ") for line in lines) == 1, lines
