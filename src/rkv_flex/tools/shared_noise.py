"""Sampling with shared random numbers, so free-running divergence can be read off teacher-forced logits.

Gumbel-max: ``argmax(log p + G)`` with ``G`` i.i.d. Gumbel is an exact sample of ``p``. When the full cache and a
policy draw with the same ``G`` at every generated position, the policy's free-running generation repeats the
full-cache trajectory for as long as its own ``argmax(log p' + G)`` picks the trajectory's token; up to its first
miss its context *is* the trajectory, so its logits there are its teacher-forced logits. The first free-running
divergence is therefore the first miss under teacher forcing, with no extra decoding (tests/test_replay.py checks
this against real free-running generation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from ..sampling import SamplingParams, filter_logits


class SharedNoiseSampler(LogitsProcessor):
    """Temperature + top-p sampling by Gumbel-max with noise fixed per (seed, generated position).

    As a logits processor for greedy ``model.generate(..., do_sample=False)`` it turns the argmax into that sample;
    :meth:`choose` draws the same way for teacher-forced logits. ``suppress`` tokens (e.g. EOS) are never drawn.
    Filtering is the compiled loop's (:func:`rkv_flex.sampling.filter_logits`).
    """

    def __init__(
        self,
        prompt_length: int,
        seed: int = 0,
        temperature: float = 0.6,
        top_p: float = 0.95,
        suppress: Sequence[int] = (),
    ):
        self.sampling = SamplingParams(do_sample=True, temperature=temperature, top_p=top_p)  # validates both
        self.prompt_length, self.seed, self.suppress = prompt_length, seed, list(suppress)

    def scores(self, logits: Tensor) -> Tensor:
        """Filtered logits over the last dim; adding Gumbel noise and taking the argmax samples from them."""
        if self.suppress:
            banned = torch.tensor(self.suppress, device=logits.device)
            logits = logits.index_fill(-1, banned, float("-inf"))
        shape = logits.shape
        filtered = filter_logits(logits.reshape(-1, shape[-1]), self.sampling.temperature, self.sampling.top_p, 0)
        return filtered.reshape(shape)

    def noise(self, step: int, batch: int, vocab: int) -> Tensor:
        """Gumbel noise [batch, vocab] for generated position ``step``, the same on every call."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return -torch.empty(batch, vocab).exponential_(generator=generator).log()

    def choose(self, logits: Tensor, first_step: int, rows: Tensor | None = None) -> Tensor:
        """Tokens [R, N] drawn from logits [B, N, V] whose column n predicts generated position first_step + n,
        for the batch rows ``rows`` (indices; every row by default)."""
        batch, count, vocab = logits.shape
        rows = torch.arange(batch) if rows is None else rows.cpu()
        noise = torch.stack([self.noise(first_step + n, batch, vocab)[rows] for n in range(count)], dim=1)
        return (self.scores(logits[rows.to(logits.device)]) + noise.to(logits.device)).argmax(dim=-1)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        batch, vocab = scores.shape
        step = input_ids.shape[1] - self.prompt_length
        return self.scores(scores) + self.noise(step, batch, vocab).to(scores.device)


def first_miss(matches: Tensor) -> Tensor:
    """Per row of a bool [B, N]: index of the first False, or N when every position matches."""
    count = matches.shape[-1]
    return torch.where(matches.all(dim=-1), count, (~matches).int().argmax(dim=-1))
