"""A conversation that keeps its compressed cache: each turn continues from what the slots kept.

transformers' convention: the next call's input_ids hold the whole conversation so far (the earlier tokens exactly as
the cache saw them), and the cache knows how many tokens it has already seen, so only the new ones are fed. Both
paths follow it: the model's own generate with cache=..., and rkv_flex.generate with cache=... and return_cache=True.
The turns here are appended in the bundled model's ChatML format.

Run: python examples/conversation.py
"""

import torch

from rkv_flex import generate, patch_model
from rkv_flex.tools.bundled import chat_prompt, load_model

model, tokenizer = load_model()
patch_model(model, budget=128, buffer=128)
end = tokenizer.eos_token_id  # <|im_end|>: the model ends its turn with it
ids = tokenizer(
    chat_prompt(tokenizer, "A shop sells pens at 3 dollars each. How much do 7 pens cost?"), return_tensors="pt"
).input_ids
cache = None
for follow_up in ("And 12 pens?", "What is the difference between the two totals?", None):
    with torch.inference_mode():
        ids, cache = generate(model, ids, max_new_tokens=200, cache=cache, return_cache=True, eos_token_id=end)
    print(tokenizer.decode(ids[0], skip_special_tokens=False).split("<|im_start|>")[-1].strip(), "\n")
    print(
        f"[{cache.get_seq_length()} tokens seen, {cache.capacity} slots per layer and head allocated, "
        f"compactions so far: {cache.compactions}]\n"
    )
    if follow_up is None:
        break
    closing = [] if ids[0, -1] == end else [end]  # a reply cut at max_new_tokens still needs its end of turn
    turn = tokenizer(f"\n<|im_start|>user\n{follow_up}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = torch.cat([ids, torch.tensor([closing + turn.input_ids])], dim=1)
