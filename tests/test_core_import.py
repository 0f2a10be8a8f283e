"""The scoring core (config, policies, scoring, RoPE statistics) imports and runs without transformers: another
serving engine's environment may pin a transformers rkv_flex does not patch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_scoring_core_imports_and_scores_without_transformers():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None  # any import of transformers now fails
        import torch
        import rkv_flex
        from rkv_flex.config import RKVConfig
        from rkv_flex.policies import SlotState, make_policy
        from rkv_flex.rope import Rope
        from rkv_flex.scoring import select_keep
        from rkv_flex.vllm_plugin import lengths, pages  # what the vLLM plugin computes with

        torch.manual_seed(0)
        batch, kv_heads, heads, slots, dim = 2, 2, 4, 12, 8
        window = torch.zeros(batch, 1, slots, dtype=torch.bool)
        window[..., -2:] = True
        state = SlotState(
            keys=torch.randn(batch, kv_heads, slots, dim),
            values=torch.randn(batch, kv_heads, slots, dim),
            valid=torch.ones(batch, kv_heads, slots, dtype=torch.bool),
            pos=torch.arange(slots).expand(batch, kv_heads, slots),
            window=window,
            queries=torch.randn(batch, heads, 2, dim),
            query_valid=torch.ones(batch, 2, dtype=torch.bool),
            scaling=dim**-0.5,
            query_center=torch.randn(batch, heads, dim),
            query_magnitude=torch.rand(batch, heads, dim // 2),
            rope=Rope(torch.rand(dim // 2), torch.ones(dim // 2), dim),
        )
        for name in ("rkv", "snapkv", "triattention"):
            config = RKVConfig(budget=6, buffer=6, window=2, policy=name)
            kept = select_keep(make_policy(config)(state), state.valid, state.window, config.budget)
            assert kept.shape == (batch, kv_heads, 6), kept.shape
        try:
            rkv_flex.patch_model
        except ImportError:
            pass  # the transformers side needs transformers, as it should
        else:
            raise AssertionError("patch_model imported without transformers")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_every_public_name_resolves_from_its_module():
    import rkv_flex

    assert sorted(rkv_flex.__all__) == sorted(rkv_flex._HOMES)
    for name in rkv_flex.__all__:
        assert getattr(rkv_flex, name).__name__ == name
