"""Compiled FlexAttention serves a shape only after agreeing with the dense reference on this machine, and what the
library computes compiled equals the eager reference on every shape it accepts. Where flex is wrong (forced here
with inductor's AVX2 code generation, which torch 2.13 gets wrong for head dim 16 over 40 slots), the library
decodes with SDPA instead and returns the tokens stock transformers returns."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._inductor.config
from conftest import tiny_model

from rkv_flex import generate, patch_model
from rkv_flex.compiled import compiled
from rkv_flex.kernel_checks import KernelChecks, shape_key, synthetic_slots
from rkv_flex.kernels import flex_span, masked_sdpa, sdpa_step, span_length

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
CAPACITIES = (40, 200, 256)  # slots per KV head: below one block, not a multiple of the block size, a multiple
GROUPS = (1, 2, 3, 7)  # query heads per KV head
KINDS = ("decode", "span")
BATCH, KV_HEADS = 2, 2


def grid() -> list[tuple[int, int, int, str]]:
    """Every head dim x capacity; the kind and the group turn with them, so every head dim and every capacity meets
    both kinds, and the groups spread over all of them (each case costs a compile of a few seconds)."""
    return [
        (dim, capacity, GROUPS[(i + 2 * j) % len(GROUPS)], KINDS[(i + j) % len(KINDS)])
        for i, dim in enumerate(HEAD_DIMS)
        for j, capacity in enumerate(CAPACITIES)
    ]


@pytest.fixture(scope="module")
def checks():
    return KernelChecks()


def random_inputs(seed: int, query_heads: int, slots: int, length: int, dim: int):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, query_heads, length, dim, generator=generator)
    keys = torch.randn(BATCH, KV_HEADS, slots, dim, generator=generator)
    values = torch.randn(BATCH, KV_HEADS, slots, dim, generator=generator)
    return generator, query, keys, values


@pytest.mark.parametrize("dim,capacity,group,kind", grid())
def test_what_runs_compiled_equals_the_eager_reference(checks, dim, capacity, group, kind):
    """On random slots other than the check's own: decoding (flex where the check trusts it, compiled SDPA
    elsewhere) and a multi-token forward (flex where trusted, the dense path elsewhere) equal the dense reference.
    Positions are random, so causality and the validity of every slot matter."""
    scale = dim**-0.5
    if kind == "decode":
        generator, query, keys, values = random_inputs(dim + capacity, KV_HEADS * group, capacity, 1, dim)
        valid, pos = synthetic_slots(BATCH, KV_HEADS, capacity, "compacted", generator)
        query_pos = torch.randint(capacity, 3 * capacity, (BATCH, 1), generator=generator)
        valid &= pos <= query_pos[:, :, None]  # a decoding step's slots hold earlier tokens (sdpa_step's premise)
        valid[:, :, 0], pos[:, :, 0] = True, 0
        if checks.decode_trusted(query, keys, values, scale, None):
            kernel = checks.graphs.get(flex_span, shape_key(query, keys, values, None, scale, None, None, None))
            got = kernel(query, keys, values, valid, pos, query_pos, scale, None)
        else:
            got = compiled(sdpa_step)(query, keys, values, valid, pos, query_pos, scale, None)
        want = masked_sdpa(query, keys, values, valid, pos, query_pos, scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    length = span_length(37)
    generator, query, keys, values = random_inputs(dim + capacity, KV_HEADS * group, capacity + length, length, dim)
    valid, pos = synthetic_slots(BATCH, KV_HEADS, capacity + length, "compacted", generator)
    real = torch.arange(length) < 37
    new_pos = 3 * (capacity + length) + torch.arange(length)
    valid[:, :, capacity:] = real
    valid[0, :, capacity : capacity + 3] = False  # row 0 is left-padded
    pos[:, :, capacity:] = new_pos
    query_pos = torch.where(real, new_pos, -1).expand(BATCH, length)
    got = checks.span(query, keys, values, valid, pos, query_pos, scale, None)
    want = masked_sdpa(query, keys, values, valid, pos, query_pos, scale)
    if got is None:  # not trusted: the library takes the dense path, which is the reference itself
        assert checks.errors[("span", shape_key(query, keys, values, None, scale, None, None, None))] > 1e-4
        return
    seen = real.clone()
    seen_rows = torch.stack([seen, seen])
    seen_rows[0, :3] = False  # padding queries' outputs are never used
    torch.testing.assert_close(got.transpose(1, 2)[seen_rows], want.transpose(1, 2)[seen_rows], rtol=1e-4, atol=1e-4)


def test_a_shape_flex_gets_wrong_is_decoded_with_sdpa_and_equals_stock():
    """The failure from the issue: head dim 16, 6 query / 2 KV heads, 24 + 16 slots, a 5-token prompt. With AVX2
    code generation torch 2.13's compiled flex returns NaN or garbage for this shape, and the compiled loop returned
    other tokens than stock transformers (and other tokens on every call). Now the check finds it, says so, and the
    compiled loop decodes with SDPA: the same tokens as stock with nothing evicted, every time."""
    model = tiny_model("llama", 6, 2, layers=3, seed=0)
    ids = torch.randint(2, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    stock = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=34, do_sample=False)
    patch_model(model, budget=24, buffer=16)
    with torch._inductor.config.patch({"cpp.simdlen": 256}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = generate(model, ids, max_new_tokens=34)
        second = generate(model, ids, max_new_tokens=34)
    assert torch.equal(first, stock) and torch.equal(second, stock)
    checked = model.__dict__["_rkv_flex_patch"].kernels.errors
    assert any(kind == "decode" for kind, _ in checked)  # the decoding kernel was checked before it was used
    wrong = [error for (kind, _), error in checked.items() if kind == "decode" and not error <= 1e-4]
    assert bool(wrong) == any("wrong on this machine" in str(w.message) for w in caught)


def test_turning_the_checks_off_trusts_flex_unchecked():
    model = patch_model(tiny_model("llama", 4, 2, seed=1), budget=16, buffer=8, check_kernels=False)
    ids = torch.randint(2, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    generate(model, ids, max_new_tokens=4)
    record = model.__dict__["_rkv_flex_patch"]
    assert record.kernels.errors == {}
    assert record.engines and all(layer.flex_decoding for e in record.engines.values() for layer in e.cache.layers)
