"""One line turns a stock transformers model into one that decodes with a bounded R-KV cache.

Run: python examples/quickstart.py   (uses the bundled SmolLM2-135M-Instruct; pass a local model path to use yours)
"""

import sys

import torch

from rkv_flex import make_cache, patch_model
from rkv_flex.tools.bundled import chat_prompt, load_model

model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
patch_model(model, budget=128, buffer=128)  # <- the one line: every later generate keeps <= 256 KV slots per layer

question = "A train travels 60 km in 45 minutes. At the same speed, how far does it travel in 3 hours?"
inputs = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt")
cache = make_cache(model)  # optional: pass your own to inspect it afterwards
with torch.inference_mode():
    output = model.generate(**inputs, cache=cache, max_new_tokens=400, do_sample=False)
print(tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
seen, slots = cache.get_seq_length(), cache.capacity
print(f"\n{seen} tokens seen, {slots} KV slots per layer held, {cache.compactions} compactions")
