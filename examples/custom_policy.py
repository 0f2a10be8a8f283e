"""Plug in your own eviction score: any function of the slot state that returns one score per slot.

The cache still keeps the newest `window` tokens and never keeps padding; your score ranks the rest (higher is
kept). Here: R-KV's score plus a bonus for the first few tokens of the sequence (attention sinks).

Run: python examples/custom_policy.py
"""

import torch

from rkv_flex import RKV, SlotState, make_cache, patch_model
from rkv_flex.bundled import chat_prompt, load_model

rkv = RKV(lam=0.1)


def rkv_with_sinks(state: SlotState) -> torch.Tensor:
    """[batch, kv_heads, slots] scores: R-KV, and the 4 first positions always win."""
    scores = rkv(state)
    return scores + (state.pos < 4).float() * 10.0


model, tokenizer = load_model()
patch_model(model, budget=128, policy=rkv_with_sinks)
inputs = tokenizer(chat_prompt(tokenizer, "What is 12 * 13 + 7?"), return_tensors="pt")
cache = make_cache(model)
output = model.generate(**inputs, cache=cache, max_new_tokens=300, do_sample=False)
print(tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
first = cache.layers[0]
print("\nlayer 0, head 0 holds positions:", sorted(first.pos[0, 0, first.valid[0, 0]].tolist())[:12], "...")
