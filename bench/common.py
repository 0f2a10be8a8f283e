"""Helpers shared by the benchmarks: step clocks, model shapes, KV sizes, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class StepClock:
    """A streamer that stamps the time of every new token (reading it to the host, which syncs a GPU)."""

    total: int | None = None
    label: str = ""
    stamps: list[float] = field(default_factory=list)
    started: float = 0.0
    _prompt_seen: bool = False
    _bar: Any = None

    def put(self, value: torch.Tensor) -> None:
        value.cpu()
        now = time.perf_counter()
        if not self._prompt_seen:  # generate streams the prompt first
            self._prompt_seen, self.started = True, now
            if self.total:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=self.label, unit="tok", leave=False, mininterval=2)
            return
        self.stamps.append(now)
        if self._bar is not None:
            self._bar.update(1)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def step_times(self) -> list[float]:
        """Seconds of each decode step (the first new token comes from the prefill and is excluded)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    weight_bytes: int
    element_bytes: int
    vocab: int
    copies: int = 2  # K and V; 1 for multi-head latent attention (one latent and rope key per token)

    @classmethod
    def of(cls, model: Any) -> Shape:
        text = model.config.get_text_config()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        vocab = model.get_output_embeddings().weight.shape[0]
        if getattr(text, "kv_lora_rank", None):
            latent = text.kv_lora_rank + text.qk_rope_head_dim
            return cls(text.num_hidden_layers, 1, latent, weights, model.dtype.itemsize, vocab, copies=1)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.num_hidden_layers, text.num_key_value_heads, head_dim, weights, model.dtype.itemsize, vocab)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V (an MLA layer: latent and rope key) of one token in every layer."""
        return self.copies * self.layers * self.kv_heads * self.head_dim * self.element_bytes


def random_prompt(batch: int, length: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (batch, length), generator=generator).to(device)


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def publish(name: str, result: dict, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> None:
    """A benchmark's results: ``<name>.json``, the table as ``<name>.md`` (also printed) and ``<name>.png``."""
    write_json(f"{name}.json", result)
    table = markdown(result)
    (RESULTS / f"{name}.md").write_text(table)
    plot(result, RESULTS / f"{name}.png")
    print(table)


def long_prompt(tokenizer, length: int, first: int = 0) -> torch.Tensor:
    """Exactly ``length`` tokens [1, length] of real text: math problems one after another (from problem ``first``
    of GSM8K then MATH-500), ending with a question about the first."""
    from rkv_flex.tools.bundled import load_problems

    problems = load_problems("gsm8k") + load_problems("math500")
    problems = problems[first:] + problems[:first]
    question = tokenizer("\n\nQuestion: what is the answer to the first problem above?\nAnswer:").input_ids
    text, ids, index = [], [], 0
    while len(ids) < length - len(question):
        text.append(f"Problem {index + 1}. {problems[index % len(problems)].question}\n")
        index += 1
        if index % 32 == 0 or len(ids) + 64 * 32 >= length:
            ids = tokenizer("".join(text)).input_ids
    ids = ids[: length - len(question)] + question
    return torch.tensor([ids])
