"""Answer accuracy on GSM8K / MATH-500 for any local model, per eviction policy and budget.

An answer is the content of the last ``\\boxed{...}`` in the output, else its last number. It matches the reference
when both are numbers that are equal, or when their normalised texts are equal.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import torch

from .bundled import MathProblem, chat_batch, chat_prompt

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalise(answer: str) -> str:
    text = answer.strip().strip("$").rstrip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("dfrac", "frac"), ("tfrac", "frac")):
        text = text.replace(old, new)
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    return re.sub(r"\s+", "", text)


def as_number(answer: str) -> Fraction | None:
    text = normalise(answer).replace(",", "").replace("\\%", "").replace("%", "")
    fraction = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    try:
        if fraction:
            sign = -1 if fraction.group(1) else 1
            return sign * Fraction(int(fraction.group(2)), int(fraction.group(3)))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    left, right = as_number(predicted), as_number(reference)
    if left is not None and right is not None:
        return left == right
    return normalise(predicted) == normalise(reference)


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    problems: list[MathProblem],
    max_new_tokens: int,
    batch: int = 1,
    compile: bool = True,
) -> tuple[int, int, int, list[dict]]:
    """(correct, total, new tokens, per-item answers) of a patched model, greedy (unless the model's
    generation_config samples). ``compile``: the engine, ``batch`` rows refilled as problems finish; otherwise
    transformers' generate on left-padded batches."""
    from .engine import Engine

    prompts = [chat_prompt(tokenizer, p.question) for p in problems]
    if compile:
        with Engine(model, batch_size=batch) as engine:
            ids = [tokenizer(prompt).input_ids for prompt in prompts]
            outputs = engine.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    else:
        outputs = []
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for start in range(0, len(problems), batch):
            inputs = chat_batch(tokenizer, [p.question for p in problems[start : start + batch]]).to(model.device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for row in output[:, inputs.input_ids.shape[1] :].tolist():
                outputs.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    correct, produced, answers = 0, 0, []
    for problem, tokens in zip(problems, outputs, strict=True):
        predicted = extract_answer(tokenizer.decode(tokens, skip_special_tokens=True))
        right = is_correct(predicted, problem.answer)
        correct += right
        produced += len(tokens)
        answers.append({"reference": problem.answer, "predicted": predicted, "correct": right})
    return correct, len(problems), produced, answers
