"""TriAttention: the score against a float64 loop of its reference's formula (keys un-rotated one by one), RoPE
read from models and inverted exactly for every RoPE type transformers ships that keeps fixed frequencies, online
and calibrated statistics, and the policy on every path (compiled equals eager, the engine equals each request
alone, head-adaptive budgets)."""

from __future__ import annotations

import naive
import pytest
import torch
from conftest import assert_compiled_equals_eager, assert_engine_equals_alone, padded_prompt, tiny_of_type
from hypothesis import given, settings
from hypothesis import strategies as st
from test_architectures import BASE

import rkv_flex.compiled
from rkv_flex import RKVConfig, make_cache, patch_model, unpatch_model
from rkv_flex.calibration import save_statistics
from rkv_flex.patch import patch_record
from rkv_flex.policies import make_policy
from rkv_flex.rope import Rope, invert, model_ropes, rotate
from rkv_flex.scoring import frequency_scores

OFFSETS = [1.0, 2.0, 4.0, 8.0, 16.0]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    slots=st.integers(3, 9),
    rotary=st.sampled_from([0, 4, 8]),
    seed=st.integers(0, 2**31),
)
def test_frequency_scores_equal_the_reference_formula_with_keys_unrotated(batch, kv_heads, group, slots, rotary, seed):
    generator = torch.Generator().manual_seed(seed)
    dim = 8
    omega = torch.zeros(dim // 2)
    omega[: rotary // 2] = torch.rand(rotary // 2, generator=generator)
    amplitude = torch.ones(dim // 2)
    amplitude[: rotary // 2] = 1.3  # YaRN-like attention factor on the rotated pairs
    rope = Rope(omega, amplitude, rotary)
    pos = torch.randint(0, 50, (batch, kv_heads, slots), generator=generator)
    raw = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    keys = rotate(raw.flatten(1, 2)[:, None], pos.flatten(1, 2), rope).view(batch, kv_heads, slots, dim)
    candidates = torch.rand(batch, kv_heads, slots, generator=generator) > 0.3
    candidates[..., 0] = True
    center = torch.randn(batch, kv_heads * group, dim, generator=generator)
    magnitude = center.view(batch, kv_heads * group, 2, dim // 2).norm(dim=2) + torch.rand(1, generator=generator)
    now = pos.amax(dim=(1, 2)) + 1
    got = frequency_scores(keys, candidates, center, magnitude, rope, now, horizon=16)  # distances 1, 2, 4, 8, 16
    want = naive.triattention(keys, pos, candidates, center, magnitude, omega, amplitude, rotary, now, OFFSETS)
    torch.testing.assert_close(got.double()[candidates], want[candidates], rtol=1e-4, atol=1e-4)


ROPES = {  # name -> the config fields that choose it (a tiny Llama; partial rotary through its factor)
    "default": {},
    "llama3": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    ),
    "yarn": dict(
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
    ),
    "longrope": dict(
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[1.0 + 0.1 * i for i in range(8)],
            long_factor=[2.0 + 0.2 * i for i in range(8)],
            original_max_position_embeddings=256,
        ),
        max_position_embeddings=1024,
    ),
}


def tiny(model_type: str = "llama", seed: int = 0, **fields):
    return tiny_of_type(model_type, {**BASE, **fields}, seed)


@pytest.mark.parametrize("name", sorted(ROPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), length=st.integers(1, 6))
def test_rope_read_from_the_model_rotates_as_it_does_and_inverts_exactly(name, seed, length):
    model = tiny(**ROPES[name])
    (rope, _) = model_ropes(model, [16, 16], ["full_attention"] * 2)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, length, 16, generator=generator, dtype=torch.float64).float()
    positions = torch.randint(0, 200, (2, length), generator=generator)
    cos, sin = model.model.rotary_emb(x, positions)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    stock, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rotate(x, positions, rope), stock, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(invert(stock, positions, rope), x, rtol=1e-4, atol=1e-4)


def test_partial_rotary_and_nope_layers_score_their_unrotated_dims_as_zero_frequency_pairs():
    partial = tiny("phi3", partial_rotary_factor=0.5, pad_token_id=0)
    (rope, _) = model_ropes(partial, [16, 16], ["full_attention"] * 2)
    assert rope.rotary == 8 and torch.all(rope.omega[4:] == 0) and torch.all(rope.omega[:4] > 0)
    nope = tiny("smollm3", no_rope_layers=[1, 0])
    ropes = model_ropes(nope, [16, 16], ["full_attention"] * 2)
    assert ropes[0].rotary == 16 and ropes[1].rotary == 0 and torch.all(ropes[1].omega == 0)


def test_a_rope_that_is_not_frequencies_per_half_split_pair_is_refused_by_name():
    with pytest.raises(ValueError, match="glm4's rotary embedding is not a rotation of the pairs"):
        patch_model(tiny("glm4", partial_rotary_factor=0.5), budget=8, policy="triattention")
    patch_model(tiny("glm4"), budget=8)  # other policies need no RoPE


def test_online_statistics_are_the_mean_unrotated_query_of_the_real_tokens():
    model = patch_model(tiny(**ROPES["yarn"]), budget=64, policy="triattention")
    ids, mask = padded_prompt(2, 9, [0, 3], seed=1)
    captured = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    cache = make_cache(model)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=cache)
    handle.remove()
    queries = torch.cat(captured, dim=1).view(2, -1, 4, 16)  # [B, T, Hq, D] before RoPE (Llama: no q norm)
    real = torch.cat([mask.bool(), torch.ones(2, queries.shape[1] - mask.shape[1], dtype=torch.bool)], dim=1)
    expected = torch.stack([queries[row][real[row]].mean(dim=0) for row in range(2)])
    moments = cache.attention[1].query_moments
    torch.testing.assert_close(moments[..., :16] / moments[..., -1:], expected, rtol=1e-4, atol=1e-4)
    assert moments[:, 0, -1].tolist() == [11.0, 8.0]  # 9 + 2 fed tokens; row 1 had 3 of padding


@pytest.mark.parametrize("allocation, backend", [("uniform", "eager"), ("adaptive", "eager"), ("uniform", "inductor")])
def test_with_eviction_compiled_equals_eager_and_the_engine_equals_each_request_alone(allocation, backend, monkeypatch):
    """On dynamo's eager backend (the graphs' bookkeeping) and once through inductor's kernels, whose compiled
    compaction once failed at run time on a tensor literal in the score."""
    monkeypatch.setattr(rkv_flex.compiled, "BACKEND", backend)
    model = patch_model(tiny(seed=2), budget=12, buffer=6, window=4, policy="triattention", allocation=allocation)
    ids, mask = padded_prompt(1, 9, seed=2)
    cache = assert_compiled_equals_eager(model, ids, mask)
    assert cache.compactions >= 2
    if backend == "eager":
        assert_engine_equals_alone(model, (5, 23, 11), (20, 9, 16))


def test_calibrated_statistics_are_read_checked_and_used(tmp_path):
    model = tiny(seed=4)
    path = str(tmp_path / "stats.safetensors")
    centre = {index: torch.randn(4, 16) for index in range(2)}
    moments = {
        i: torch.cat([c * 5, c.view(4, 2, 8).norm(dim=1) * 5 + 1, torch.full((4, 1), 5.0)], -1)
        for i, c in centre.items()
    }
    save_statistics(path, "llama", moments, tokens=5)
    patch_model(model, budget=12, buffer=6, window=4, policy="triattention", statistics=path)
    cache = make_cache(model)
    ids = padded_prompt(1, 30, seed=4)[0]
    model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, cache=cache)
    assert cache.compactions >= 1 and cache.attention[0].query_moments is None  # nothing accumulated
    torch.testing.assert_close(cache.attention[1].spec.statistics[0], centre[1])
    with pytest.raises(ValueError, match="calibrated on a llama model, not qwen2"):
        patch_model(tiny("qwen2"), budget=12, policy="triattention", statistics=path)
    with pytest.raises(ValueError, match="statistics is for policy='triattention', not 'rkv'"):
        RKVConfig(budget=12, policy="rkv", statistics=path)
    with pytest.raises(ValueError, match="no calibration file"):
        RKVConfig(budget=12, policy="triattention", statistics=str(tmp_path / "missing"))


def test_calibration_reads_a_text_through_the_model_and_saves_what_online_statistics_would_hold(tmp_path):
    from rkv_flex.tools.calibrate import calibrate

    model = tiny(seed=5)
    ids = padded_prompt(1, 40, seed=5)[0]
    path = str(tmp_path / "calibrated.safetensors")
    assert calibrate(model, ids, path, chunk=16) == 40
    assert model.config._attn_implementation != "rkv_flex"  # unpatched again
    patch_model(model, budget=64, policy="triattention")
    cache = make_cache(model)
    model(input_ids=ids, cache=cache)
    online = cache.attention[1].query_moments[0]
    patch_model(tiny(seed=5), budget=8, policy="triattention", statistics=path)  # a valid file for this model
    from rkv_flex.calibration import load_statistics

    center, magnitude = load_statistics(path, model, {1: (4, 16)})[1]
    torch.testing.assert_close(center, online[:, :16] / 40, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(magnitude, online[:, 16:24] / 40, rtol=1e-4, atol=1e-5)


def test_every_supported_architecture_runs_triattention_or_is_refused_for_its_interleaved_rope():
    """Each tiny model of the architecture tests: patched with TriAttention, a generation with compactions runs
    within capacity; only the interleaved-RoPE families and latent attention are refused, by name, when patching.
    The default policy ("auto") is TriAttention on the others and R-KV on those."""
    import test_architectures
    import test_families
    import test_hybrids
    import test_kv_sharing
    import test_latent

    makers = {t: (test_architectures.tiny, t) for t in test_architectures.TINY}
    makers |= {t: (test_families.tiny, t) for t in test_families.FAMILIES}
    makers |= {t: (test_hybrids.tiny, t) for t in test_hybrids.HYBRIDS}
    makers |= {t: (test_kv_sharing.tiny, t) for t in test_kv_sharing.SHARING}
    makers |= {t: (test_latent.tiny, t) for t in test_latent.FAMILIES}
    refused = set()
    for model_type, (make, name) in sorted(makers.items()):
        model = make(name, seed=0)
        try:
            patch_model(model, budget=10, buffer=4, window=2, policy="triattention")
        except ValueError as error:
            assert "is not a rotation of the pairs" in str(error) or "rotates only its last" in str(error)
            refused.add(model_type)
            patch_model(model, budget=10, buffer=4, window=2)
            assert patch_record(model).config.policy == "rkv", model_type
            continue
        cache = make_cache(model)
        ids = padded_prompt(1, 12, seed=0)[0]
        model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, cache=cache)
        assert cache.compactions >= 2 and max(cache.planner.used) <= 14, model_type
        unpatch_model(model)
        patch_model(model, budget=10, buffer=4, window=2)
        assert patch_record(model).config.policy == "triattention", model_type
    assert refused == {"glm4", "ernie4_5", "ernie4_5_moe", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "kimi_linear"}


def test_the_auto_policy_is_made_concrete_before_any_scoring():
    from rkv_flex.cache import LayerSpec, RKVCache

    assert RKVConfig(budget=8).policy == "auto"
    assert RKVCache(RKVConfig(budget=8), [LayerSpec(query_group=2)]).config.policy == "rkv"  # no RoPE given
    rope = Rope.none(16)
    assert RKVCache(RKVConfig(budget=8), [LayerSpec(query_group=2, rope=rope)]).config.policy == "triattention"
    with pytest.raises(ValueError, match="policy 'auto' depends on the model"):
        make_policy(RKVConfig(budget=8))
