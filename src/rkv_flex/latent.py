"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash, Kimi, LongCat): attention over latent slots.

An MLA layer caches, per token, one latent ``c`` of ``kv_lora_rank`` channels and one RoPE key ``r`` of
``qk_rope_head_dim`` shared by every head; transformers up-projects all cached latents to per-head keys and values
at every forward (``expand_kv``). rkv_flex keeps the latents instead and absorbs the up-projection into the queries
and the output, which is the same arithmetic in another order:

    q_h . k_h = (W_uk_h^T q_nope_h) . c + q_rope_h . r        out_h = W_uv_h (sum_j p_j c_j)

So one latent layer is one KV head whose key is ``[c, r]`` (rank + rope channels) and whose value is ``c`` (the key's
first ``rank`` channels, stored once), read by every query head: R-KV scores, keeps and attends it like any other
KV head, with the whole head count as its query group (docs/method.md, section 11).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_latent(module: torch.nn.Module) -> bool:
    """An attention module of the MLA form transformers uses (latents in the cache, ``expand_kv`` after it)."""
    return hasattr(module, "kv_b_proj") and hasattr(module, "kv_lora_rank") and hasattr(module, "expand_kv")


def latent_config(text: Any) -> tuple[int, int] | None:
    """(rank, rope channels) of an MLA config, or None for any other."""
    rank = getattr(text, "kv_lora_rank", None)
    return None if rank is None else (rank, text.qk_rope_head_dim)


def latent_inputs(self: torch.nn.Module, latents: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Replaces an MLA module's ``expand_kv`` while patched: attention gets the latent key ``[c, r]`` [B, 1, S,
    rank + rope] and value ``c`` [B, 1, S, rank]. An RKVCache already returns its slots in that form; a forward
    without a cache hands over this forward's raw ``(c, r)``."""
    if latents.shape[-1] == self.kv_lora_rank:  # raw: (c, r)
        return torch.cat([latents, second], dim=-1), latents
    return latents, second


def up_projections(module: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """The key and value up-projections of ``kv_b_proj``, per head: [H, nope, rank] and [H, v, rank]."""
    weight = module.kv_b_proj.weight
    heads = weight.shape[0] // (module.qk_nope_head_dim + module.v_head_dim)
    per_head = weight.view(heads, module.qk_nope_head_dim + module.v_head_dim, weight.shape[-1])
    return per_head[:, : module.qk_nope_head_dim], per_head[:, module.qk_nope_head_dim :]


def absorb_query(module: torch.nn.Module, query: Tensor) -> Tensor:
    """Queries [B, H, L, nope + rope] as latent queries [B, H, L, rank + rope]."""
    key_up, _ = up_projections(module)
    nope, rope = query.split([module.qk_nope_head_dim, query.shape[-1] - module.qk_nope_head_dim], dim=-1)
    return torch.cat([torch.einsum("bhld,hdr->bhlr", nope, key_up), rope], dim=-1)


def expand_output(module: torch.nn.Module, out: Tensor) -> Tensor:
    """Attention's output in latent space [B, H, L, rank] as each head's values [B, H, L, v]."""
    _, value_up = up_projections(module)
    return torch.einsum("bhlr,hvr->bhlv", out, value_up)
