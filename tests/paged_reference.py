"""A naive reference of what rkv_flex keeps, one request at a time: transformers' own forward over its own
``DynamicCache`` (no rkv_flex cache, no patching), each compaction done by hand on dense tensors with rkv_flex's
policies. It needs only transformers' attention interface, so it runs in vLLM's environment (an older transformers)
as in ours: the vLLM plugin is checked against it there, and rkv_flex's transformers path here."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rkv_flex.config import RKVConfig
from rkv_flex.policies import SlotState, make_policy
from rkv_flex.scoring import select_keep

RECORDER = "rkv_reference"
_recorded: dict[int, tuple[torch.Tensor, float]] = {}  # layer -> (its last forward's post-RoPE queries, scaling)


def _recording_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    _recorded[module.layer_idx] = (query.detach().clone(), scaling)
    if attention_mask is None:  # one request, no padding: causal, aligned to the newest key (a chunk after a cache)
        new, held = query.shape[2], key.shape[2]
        attention_mask = torch.arange(held)[None, :] <= torch.arange(held - new, held)[:, None]
        attention_mask = attention_mask[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@torch.no_grad()
def reference_decode(
    model,
    prompt: list[int],
    new_tokens: int,
    config: RKVConfig,
    plan_past_end: bool = False,
    prompt_pieces: list[int] | None = None,
):
    """Greedy tokens of ``prompt`` (read in one forward, or in ``prompt_pieces``, then one token per step) and, per
    layer, the positions each KV head holds at the end [Hkv, held]. ``plan_past_end``: also compact where the token
    after the last would not fit (transformers' ``generate`` plans that step, then cancels it; the compaction
    stays)."""
    AttentionInterface.register(RECORDER, _recording_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORDER)
    try:
        return _decode(model, prompt, new_tokens, config, plan_past_end, prompt_pieces or [len(prompt)])
    finally:
        model.set_attn_implementation(previous)


def _decode(model, prompt, new_tokens, config, plan_past_end, pieces):
    if sum(pieces) != len(prompt):
        raise ValueError(f"prompt pieces {pieces} do not add up to the prompt's {len(prompt)} tokens")
    policy, capacity, window = make_policy(config), config.budget + config.buffer, config.window
    cache, positions, queries = DynamicCache(), {}, {}
    held, seen, tokens = 0, 0, []
    starts = [sum(pieces[:index]) for index in range(len(pieces))]
    feeds = [prompt[start : start + piece] for start, piece in zip(starts, pieces, strict=True)]
    while len(tokens) < new_tokens:
        feed = feeds.pop(0) if feeds else tokens[-1:]
        length = len(feed)
        staged = False
        if held + length > capacity:
            if config.budget + length <= capacity:
                _compact(cache, positions, queries, policy, config)  # before the new tokens, as rkv_flex plans
                held = config.budget
            else:
                staged = True  # attend everything, then keep ``budget``
        ids = torch.tensor([feed])
        logits = model(
            input_ids=ids, position_ids=torch.arange(seen, seen + length)[None], past_key_values=cache, use_cache=True
        ).logits
        fresh = torch.arange(seen, seen + length)
        for layer, (query, scaling) in _recorded.items():
            heads = cache.layers[layer].keys.shape[1]
            positions[layer] = torch.cat([positions.get(layer, fresh[:0].expand(heads, 0)), fresh.expand(heads, -1)], 1)
            old = queries.get(layer, (query[0, :, :0], scaling))[0]
            queries[layer] = (torch.cat([old, query[0]], dim=1)[:, -window:], scaling)
        held, seen = held + length, seen + length
        if staged:
            _compact(cache, positions, queries, policy, config)
            held = config.budget
        if not feeds:
            tokens.append(int(logits[0, -1].argmax()))
    if plan_past_end and held + 1 > capacity:
        _compact(cache, positions, queries, policy, config)
    return tokens, positions


def _compact(cache, positions, queries, policy, config):
    for layer, slots in enumerate(cache.layers):
        keys, values = slots.keys, slots.values  # [1, Hkv, S, D]
        held = keys.shape[2]
        valid = torch.ones(keys.shape[:3], dtype=torch.bool)
        newest = (torch.arange(held) >= held - config.window).expand_as(valid)
        query, scaling = queries[layer]
        state = SlotState(
            keys=keys.float(),
            values=values.float(),
            valid=valid,
            pos=positions[layer][None],
            window=newest[:, :1],
            queries=query[None].float(),
            query_valid=torch.ones(1, query.shape[1], dtype=torch.bool),
            scaling=scaling,
        )
        kept = select_keep(policy(state), valid, newest, config.budget)
        by_dim = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
        slots.keys, slots.values = keys.gather(2, by_dim), values.gather(2, by_dim)
        positions[layer] = positions[layer].gather(1, kept[0])
