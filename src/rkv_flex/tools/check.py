"""``rkv_flex.check``: is the compression really running, and is it right, on this model and this machine?

It answers in well under a minute for a small model: the model writes a short answer with its full cache; that text
is replayed, teacher-forced, through the compressed cache (what decoding would hold), and through the compiled and
the eager decoding step from the same state. The report: KV slots and bytes held against a full cache, compactions
done, top-1 agreement and KL of the next-token distribution against the full cache, and whether the compiled step
agrees with the eager one (the largest logit difference, and the steps whose top token differs beyond a near-tie).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..cache import compact_layers
from ..config import RKVConfig
from ..engine import StepBuffers, forward_step
from ..forward import feed, prompt_pieces
from ..patch import is_patched, make_cache, patch_model, patch_record, unpatch_model
from .replay import replay

DEFAULT_TEXT = (
    "A train leaves at 9:40 and arrives at 13:05, stopping twice for 12 minutes each. How many minutes is it moving? "
    "Reason step by step."
)
CHECK_SETTINGS = dict(budget=128, buffer=64)  # small enough that a short answer is compacted several times
NEAR_TIE = 1e-3  # top-2 logit margin below which a different top token is not counted as a disagreement


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check` measured (all on this model, this machine, this run)."""

    model_type: str
    settings: dict
    prompt_tokens: int
    tokens: int  # prompt + the model's own answer, replayed
    slots_held: int  # KV slots per layer and KV head the compressed cache holds
    kv_bytes_held: int
    kv_bytes_full: int  # a full cache of ``tokens`` tokens
    compactions: int
    top1_agreement: float  # next-token argmax equal to the full cache's, over the answer
    kl: float  # mean KL(full || compressed) of the next-token distribution, over the answer
    compiled_steps: int  # decoding steps compared, compiled against eager
    compiled_max_logit_difference: float
    compiled_top1_disagreements: int  # steps whose top token differs and is not a near-tie
    decode_kernels: tuple[str, ...]  # what compiled decoding runs per layer: flex, or sdpa where flex is wrong
    seconds: float

    @property
    def compressing(self) -> bool:
        return self.compactions > 0 and self.kv_bytes_held < self.kv_bytes_full

    @property
    def compiled_equals_eager(self) -> bool:
        return self.compiled_top1_disagreements == 0

    def as_dict(self) -> dict:
        return asdict(self) | {"compressing": self.compressing, "compiled_equals_eager": self.compiled_equals_eager}

    def __str__(self) -> str:
        saved = 1 - self.kv_bytes_held / self.kv_bytes_full
        layers = len(self.decode_kernels)
        kernels = ", ".join(f"{kind} in {self.decode_kernels.count(kind)}" for kind in sorted(set(self.decode_kernels)))
        return "\n".join(
            [
                f"rkv_flex check: {self.model_type}, {self.settings}",
                f"  compression running:   {'yes' if self.compressing else 'NO'} ({self.compactions} compactions "
                f"over {self.tokens} tokens, {self.prompt_tokens} of them prompt)",
                f"  KV held:               {self.slots_held} slots per layer and KV head, "
                f"{self.kv_bytes_held / 2**20:.2f} MiB vs {self.kv_bytes_full / 2**20:.2f} MiB full "
                f"({saved:.0%} saved)",
                f"  vs the full cache:     top-1 agreement {self.top1_agreement:.3f}, mean KL {self.kl:.4f}",
                f"  compiled vs eager:     {'equal' if self.compiled_equals_eager else 'DIFFERENT'} over "
                f"{self.compiled_steps} steps (largest logit difference {self.compiled_max_logit_difference:.2g}, "
                f"{self.compiled_top1_disagreements} top-1 disagreements beyond near-ties)",
                f"  compiled decoding:     {kernels} of {layers} layers (sdpa where flex is wrong here)",
                f"  took {self.seconds:.1f} s",
            ]
        )


def check(
    model: Any,
    tokenizer: Any = None,
    text: str | None = None,
    *,
    answer_tokens: int | None = None,
    verbose: bool = True,
    **settings: Any,
) -> CheckReport:
    """Check rkv_flex on ``model`` (patched or not) and report what it measured; prints the report unless
    ``verbose=False``.

    A patched model is checked with its own settings (pass none); an unpatched one with ``settings`` (RKVConfig
    fields; default budget 128, buffer 64) and is left unpatched. ``text`` (with ``tokenizer``) is the prompt, in the
    chat template when the tokenizer has one; without a tokenizer the model starts from its BOS token. The model then
    answers ``answer_tokens`` tokens greedily with its full cache (default: enough to fill the slots and compact
    twice more), and that sequence is replayed.
    """
    start = time.perf_counter()
    if is_patched(model):
        if settings:
            raise ValueError("this model is patched: check() uses its settings; unpatch it to check other ones")
        config = patch_record(model).config
        unpatch_model(model)  # the full-cache reference needs the stock model; patched again below
        repatch = True
    else:
        config, repatch = RKVConfig(**(CHECK_SETTINGS | settings)), False
    if text is not None and tokenizer is None:
        raise ValueError("text needs the model's tokenizer (check(model, tokenizer, text))")
    wrong = isinstance(answer_tokens, bool) or not isinstance(answer_tokens, (int, type(None)))
    if wrong or (answer_tokens is not None and answer_tokens < 2 * config.buffer):
        raise ValueError(f"answer_tokens must be an int >= 2 x buffer ({2 * config.buffer}), got {answer_tokens!r}")
    try:
        prompt = prompt_ids(model, tokenizer, text)
        if answer_tokens is None:
            answer_tokens = max(2 * config.buffer, config.capacity + 2 * config.buffer - prompt.shape[1])
        with torch.no_grad():
            sequence = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=answer_tokens,
                min_new_tokens=answer_tokens,
                do_sample=False,
            )
            full_logits = model(sequence).logits[0, prompt.shape[1] - 1 : -1].float()
        patch_model(model, config)
        report = measure(model, config, prompt.shape[1], sequence, full_logits, start)
    finally:
        if is_patched(model) and not repatch:
            unpatch_model(model)
        elif repatch and not is_patched(model):
            patch_model(model, config)
    if verbose:
        print(report)
    return report


def prompt_ids(model: Any, tokenizer: Any, text: str | None) -> Tensor:
    if tokenizer is None:
        bos = model.generation_config.bos_token_id or model.config.bos_token_id or 0
        return torch.tensor([[bos]], device=model.device)
    content = text or DEFAULT_TEXT
    if getattr(tokenizer, "chat_template", None):
        content = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return tokenizer(content, return_tensors="pt").input_ids.to(model.device)


def measure(
    model: Any, config: RKVConfig, prompt: int, sequence: Tensor, full_logits: Tensor, start: float
) -> CheckReport:
    """The report's numbers, for a patched ``model``."""
    cache = make_cache(model)
    chunks = [logits for _, logits in replay(model, cache, sequence[:, :-1], None, prompt)]
    compressed = torch.cat(chunks, dim=1)[0].float()
    full = full_logits.log_softmax(-1)
    kl = (full.exp() * (full - compressed.log_softmax(-1))).sum(-1)
    agreement = (compressed.argmax(-1) == full_logits.argmax(-1)).float()
    compiled, eager, kernels = compiled_and_eager_steps(model, config, sequence)
    difference = (compiled - eager).abs().max(dim=-1).values
    top2 = eager.topk(2, dim=-1).values
    ties = top2[:, 0] - top2[:, 1] < NEAR_TIE
    disagreements = ((compiled.argmax(-1) != eager.argmax(-1)) & ~ties).sum()
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8
    full_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element * sequence.shape[1]
    changed = {
        name: value for name, value in vars(config).items() if value != RKVConfig.__dataclass_fields__[name].default
    }
    return CheckReport(
        model_type=model.config.model_type,
        settings=changed,
        prompt_tokens=prompt,
        tokens=sequence.shape[1],
        slots_held=cache.capacity,
        kv_bytes_held=cache.kv_bytes,
        kv_bytes_full=full_bytes,
        compactions=cache.compactions,
        top1_agreement=float(agreement.mean()),
        kl=float(kl.mean()),
        compiled_steps=compiled.shape[0],
        compiled_max_logit_difference=float(difference.max()),
        compiled_top1_disagreements=int(disagreements),
        decode_kernels=kernels,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def compiled_and_eager_steps(model: Any, config: RKVConfig, sequence: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """Logits [N, V] of the compiled and of the eager decoding step, teacher-forced over the same tokens from the
    same state: the sequence up to a few tokens short of full slots is prefilled, then ``2 x buffer`` tokens are
    decoded one per step (through at least one compaction). Also what compiled decoding runs per layer."""
    record = patch_record(model)
    start = max(1, min(config.capacity - config.window, sequence.shape[1] - 2 * config.buffer))
    tokens = sequence[:, start : start + 2 * config.buffer]
    results, kernels = [], ()
    for compile in (True, False):
        cache = make_cache(model)
        feed(model, cache, sequence, torch.ones_like(sequence), 0, prompt_pieces(start, config))
        buffers = StepBuffers.allocate(1, model.get_output_embeddings().weight.shape[0], model.device)
        buffers.finished.fill_(False)  # the row decodes (a fresh engine's rows wait for requests)
        step = forward_step
        if compile:
            cache.choose_decode_kernels()
            kernels = tuple("flex" if layer.flex_decoding else "sdpa" for layer in cache.attention)
            shape = (1, cache.capacity, model.dtype, str(model.device))
            step = record.graphs.get(forward_step, shape)
            if cache.policy.traceable:
                cache.compactor = record.graphs.get(compact_layers, shape)
        logits = []
        for index in range(tokens.shape[1]):
            buffers.tokens.copy_(tokens[:, index : index + 1])
            buffers.positions.fill_(start + index)
            cache.begin_step(1)
            step(model, cache, buffers)
            cache.step_ran()
            logits.append(buffers.logits[0].clone())
        results.append(torch.stack(logits).float())
    return results[0], results[1], kernels
