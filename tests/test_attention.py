"""The slot mask as flex mask_mod, as BlockMask and as dense tensor agree; compiled flex equals the SDPA reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from rkv_flex.attention import compiled_flex_attention, masked_sdpa
from rkv_flex.cache import RKVLayer
from rkv_flex.config import RKVConfig
from rkv_flex.masks import dense_slot_mask, slot_mask_mod
from rkv_flex.policies import make_policy

BATCH, HEADS, KV_HEADS, DIM = 2, 6, 2, 16  # GQA 3: not a power of two
CONFIG = RKVConfig(budget=150, buffer=50)  # 200 slots: two blocks of 128, the last one partial


def random_slots(seed: int, slots: int, query_length: int = 1):
    generator = torch.Generator().manual_seed(seed)
    valid = torch.rand(BATCH, KV_HEADS, slots, generator=generator) > 0.4
    pos = torch.stack([torch.randperm(3 * slots, generator=generator)[:slots] for _ in range(BATCH * KV_HEADS)])
    pos = pos.reshape(BATCH, KV_HEADS, slots)
    query_pos = torch.randint(slots, 3 * slots, (BATCH, query_length), generator=generator)
    # every query sees at least its own newest slot
    valid[:, :, 0] = True
    pos[:, :, 0] = query_pos.min(dim=1).values[:, None]
    return valid, pos, query_pos


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), query_length=st.integers(1, 4), window=st.sampled_from([None, 3, 40]))
def test_mask_mod_equals_dense_reference(seed, query_length, window):
    valid, pos, query_pos = random_slots(seed, 24, query_length)
    group = HEADS // KV_HEADS
    mask_mod = slot_mask_mod(valid, pos, query_pos, group, window)
    materialized = create_mask(mask_mod, BATCH, HEADS, query_length, 24, device="cpu")
    reference = dense_slot_mask(valid, pos, query_pos, window).repeat_interleave(group, dim=1)
    assert torch.equal(materialized, reference)
    for b in range(BATCH):  # and the rule itself, element by element
        for h in range(HEADS):
            for q in range(query_length):
                for s in range(24):
                    key_pos, q_pos = pos[b, h // group, s], query_pos[b, q]
                    want = bool(valid[b, h // group, s]) and key_pos <= q_pos
                    want = want and (window is None or q_pos - key_pos < window)
                    assert bool(reference[b, h, q, s]) == want


@pytest.fixture(scope="module")
def layer():
    """A 200-slot layer whose decode BlockMask is built once; tests mutate its tensors in place."""
    layer = RKVLayer(CONFIG, HEADS, make_policy(CONFIG))
    layer.lazy_initialization(torch.zeros(BATCH, KV_HEADS, 1, DIM), None)
    return layer


def fill(layer, seed):
    valid, pos, query_pos = random_slots(seed, CONFIG.capacity)
    generator = torch.Generator().manual_seed(seed + 1)
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=generator))
    layer.values.copy_(torch.randn(layer.values.shape, generator=generator))
    layer.valid.copy_(valid)
    layer.pos.copy_(pos)
    layer.query_pos.copy_(query_pos)
    return torch.randn(BATCH, HEADS, 1, DIM, generator=generator)


def test_block_mask_dense_form_equals_boolean_reference(layer):
    fill(layer, 0)
    block_mask = layer.block_mask
    assert block_mask.to_dense().all()  # every block is visited; the mask_mod decides inside them
    assert block_mask.shape[-2:] == (1, CONFIG.capacity)
    materialized = create_mask(block_mask.mask_mod, BATCH, HEADS, 1, CONFIG.capacity, device="cpu")
    reference = dense_slot_mask(layer.valid, layer.pos, layer.query_pos).repeat_interleave(3, dim=1)
    assert torch.equal(materialized, reference)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_compiled_flex_equals_sdpa_on_the_same_slots(layer, seed):
    block_mask = layer.block_mask
    query = fill(layer, seed)  # in place: the same BlockMask must see the new slot state
    out = compiled_flex_attention(query, layer.keys, layer.values, block_mask=block_mask, scale=0.3, enable_gqa=True)
    reference = masked_sdpa(query, layer.keys, layer.values, layer.valid, layer.pos, layer.query_pos, 0.3)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
