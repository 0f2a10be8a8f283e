"""Plug in your own eviction score: a small Policy class (or any function of the slot state) that returns one score
per slot.

The cache still keeps the newest `window` tokens and never keeps padding; your score ranks the rest (higher is
kept). Here: R-KV's score plus a bonus for the first few tokens of the sequence (attention sinks). A Policy
subclass runs inside the compiled compaction graph; a plain function runs eagerly, its output checked.

Run: python examples/custom_policy.py
"""

from dataclasses import dataclass

import torch

from rkv_flex import RKV, Engine, Policy, SlotState, patch_model
from rkv_flex.tools.bundled import chat_prompt, load_model


@dataclass(frozen=True)
class RKVWithSinks(Policy):
    """R-KV, and the first ``sinks`` positions always win."""

    sinks: int = 4
    lam: float = 0.1

    def __call__(self, state: SlotState) -> torch.Tensor:  # [batch, kv_heads, slots]
        return RKV(lam=self.lam)(state) + (state.pos < self.sinks).float() * 10.0


model, tokenizer = load_model()
patch_model(model, budget=128, policy=RKVWithSinks())
prompt = tokenizer(chat_prompt(tokenizer, "What is 12 * 13 + 7?")).input_ids
with Engine(model, batch_size=1) as engine:
    (answer,) = engine.generate([prompt], max_new_tokens=300, eos_token_id=tokenizer.eos_token_id)
    first = engine.cache.layers[0].slots
    print(tokenizer.decode(answer, skip_special_tokens=True))
    print("\nlayer 0, head 0 holds positions:", sorted(first.pos[0, 0, first.valid[0, 0]].tolist())[:12], "...")
