"""Answer accuracy on GSM8K / MATH-500 for any local model, per eviction policy and budget.

An answer is the content of the last ``\\boxed{...}`` in the output, else its last number. It matches the reference
when both are numbers that are equal, or when their normalised texts are equal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass
class Progress:
    """How far an evaluation is: problems answered, correct among them, tokens generated, seconds spent."""

    done: int
    total: int
    correct: int
    tokens: int
    seconds: float

    def __str__(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        return f"{self.done}/{self.total} problems, {rate:.1f} tokens/s, accuracy so far {self.correct}/{self.done}"


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    problems: list[MathProblem],
    max_new_tokens: int,
    batch: int = 1,
    compile: bool = True,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[int, int, int, list[dict]]:
    """(correct, total, new tokens, per-item answers) of a patched model, greedy (unless the model's
    generation_config samples). ``compile``: the engine, ``batch`` rows refilled as problems finish; otherwise
    transformers' generate on left-padded batches. ``progress`` is called each time problems are answered."""
    start, answers = time.perf_counter(), [None] * len(problems)
    correct = produced = 0

    def answered(index: int, tokens: list[int]) -> None:
        nonlocal correct, produced
        problem = problems[index]
        predicted = extract_answer(tokenizer.decode(tokens, skip_special_tokens=True))
        right = is_correct(predicted, problem.answer)
        correct, produced = correct + right, produced + len(tokens)
        answers[index] = {"reference": problem.answer, "predicted": predicted, "correct": right}

    def report() -> None:
        if progress is not None:
            done = sum(answer is not None for answer in answers)
            progress(Progress(done, len(problems), correct, produced, time.perf_counter() - start))

    for index, tokens in answers_as_they_finish(model, tokenizer, problems, max_new_tokens, batch, compile):
        answered(index, tokens)
        report()
    return correct, len(problems), produced, answers


def answers_as_they_finish(
    model: Any, tokenizer: Any, problems: list[MathProblem], max_new_tokens: int, batch: int, compile: bool
) -> Iterator[tuple[int, list[int]]]:
    """(problem index, generated token ids) for every problem, in the order they finish."""
    from ..engine import Engine

    if compile:
        prompts = [tokenizer(chat_prompt(tokenizer, p.question)).input_ids for p in problems]
        produced: dict[int, list[int]] = {}
        with Engine(model, batch_size=batch) as engine:
            for event in engine.stream(prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id):
                produced.setdefault(event.index, []).extend(event.tokens)
                if event.finished:
                    yield event.index, produced.pop(event.index)
        return
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for first in range(0, len(problems), batch):
        inputs = chat_batch(tokenizer, [p.question for p in problems[first : first + batch]]).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        for offset, row in enumerate(output[:, inputs.input_ids.shape[1] :].tolist()):
            eos = tokenizer.eos_token_id
            yield first + offset, row[: row.index(eos) + 1] if eos in row else row
