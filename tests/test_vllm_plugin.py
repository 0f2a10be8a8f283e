"""The vLLM plugin inside vLLM 0.32's CPU build (``nox -s vllm``; skipped where vLLM is not installed). Tiny random
models saved to disk; one engine per setting, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the test can
read the scheduler's and the worker's state. With nothing evicted the tokens equal stock vLLM's; with eviction the
tokens and each request's kept positions equal the naive reference (tests/paged_reference.py), which
test_paged_reference.py shows equal to rkv_flex's transformers path."""

from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402
from paged_reference import reference_decode  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from rkv_flex import RKVConfig  # noqa: E402

SHAPE = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # the smallest head vLLM's CPU attention serves
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=4096,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
BLOCK = 32
SETTINGS = dict(budget=40, buffer=8, window=4)  # 48 slots: one compaction every 8 decoding tokens
NEW = 70
KV_BYTES = 64 << 20  # vLLM's KV pool per engine, set outright: many engines share this process's memory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model type -> a directory holding a tiny random model of it."""
    paths = {}
    for model_type in ("llama", "qwen2", "qwen3"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SHAPE)).eval()
        paths[model_type] = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(paths[model_type])
    return paths


def engine(path, settings: dict | None, **options) -> LLM:
    extra = {} if settings is None else {"additional_config": {"rkv_flex": settings}}
    return LLM(
        model=str(path),
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        block_size=BLOCK,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=KV_BYTES,
        **extra,
        **options,
    )


def generate(llm: LLM, prompts: list[list[int]], new_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False) for n in new_tokens]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def sides(llm: LLM):
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler._rkv_flex, core.model_executor.driver_worker.worker.model_runner._rkv_flex


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_with_nothing_evicted_the_plugin_decodes_as_stock_vllm(saved, model_type):
    prompts, new = prompts_of([6, 37, 70], seed=1), [60, 45, 60]
    stock = generate(engine(saved[model_type], None), prompts, new)
    plugin = engine(saved[model_type], dict(budget=200, buffer=8))
    assert generate(plugin, prompts, new) == stock
    scheduler, worker = sides(plugin)
    assert scheduler.freed == 0 and all(
        r.compactions == 0 for r in [*worker.retired.values(), *worker.requests.values()]
    )


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_with_eviction_tokens_and_kept_positions_equal_the_reference(saved, model_type):
    """Requests of different lengths at once, a prompt longer than budget + buffer among them; KV blocks return to
    the pool while requests go on, and all of them at the end."""
    llm = engine(saved[model_type], SETTINGS)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    lengths, new = [6, 37, 70, 12, 3], [NEW, 50, NEW, 45, NEW]  # each beyond budget + buffer
    prompts = prompts_of(lengths, seed=2)
    got = generate(llm, prompts, new)
    scheduler, worker = sides(llm)
    assert scheduler.freed > 0 and pool.get_num_free_blocks() == free_at_start

    assert_equal_to_the_reference(saved[model_type], worker, prompts, got, new)


def assert_equal_to_the_reference(path, worker, prompts, got, new, skip=()):
    """Each request's tokens and kept positions equal the reference's, its prompt read in the pieces vLLM's
    scheduler cut it into (requests in ``skip``, by index, are not compared)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = RKVConfig(policy="rkv", prefill_chunk=None, **SETTINGS)
    states = [*worker.retired.values(), *worker.requests.values()]  # the last to finish are not told yet
    for index, (prompt, tokens, n) in enumerate(zip(prompts, got, new, strict=True)):
        if index in skip:
            continue
        request = next(r for r in states if sum(r.steps) == len(prompt) + n - 1)
        pieces = request.steps[: len(request.steps) - (n - 1)]  # the prompt as vLLM's scheduler cut it
        expected, positions = reference_decode(model, prompt, n, config, prompt_pieces=pieces)
        assert tokens == expected
        assert request.compactions >= 1
        for layer, held in positions.items():
            kept = request.positions(layer, held.shape[0])
            assert torch.equal(kept.sort(dim=1).values, held.sort(dim=1).values)


def test_prompts_read_in_chunks_beyond_budget_plus_buffer_equal_the_reference(saved):
    """vLLM cuts prompts into chunks of its token budget per step, shared with the decoding requests: chunks
    longer than ``buffer`` (attended with everything held, then compacted) and shorter ones (compacted first)."""
    llm = engine(saved["llama"], SETTINGS, max_num_batched_tokens=32, max_num_seqs=4)
    lengths, new = [100, 61, 9, 75], [40, NEW, 50, 45]
    prompts = prompts_of(lengths, seed=3)
    got = generate(llm, prompts, new)
    _, worker = sides(llm)
    states = [*worker.retired.values(), *worker.requests.values()]
    assert any(max(r.steps) > SETTINGS["buffer"] and len(r.steps) > max(new) for r in states)  # chunked prompts
    assert any(1 < piece <= SETTINGS["buffer"] for r in states for piece in r.steps)
    assert_equal_to_the_reference(saved["llama"], worker, prompts, got, new)


def test_an_aborted_request_gives_its_blocks_back_and_the_others_go_on(saved):
    llm = engine(saved["llama"], SETTINGS)
    engine_core = llm.llm_engine
    pool = engine_core.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    prompts = prompts_of([20, 33, 7], seed=4)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, detokenize=False)
    for index, prompt in enumerate(prompts):
        engine_core.add_request(str(index), TokensPrompt(prompt_token_ids=prompt), params)
    core = engine_core.engine_core.engine_core
    manager = core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    runner = core.model_executor.driver_worker.worker.model_runner
    done, steps = {}, 0
    while engine_core.has_unfinished_requests():
        for output in engine_core.step():
            if output.finished:
                done[output.request_id] = list(output.outputs[0].token_ids)
        steps += 1
        for request_id, blocks in manager.req_to_blocks.items():  # both sides hold the same blocks, every step
            if blocks and request_id in runner.requests and request_id not in done:
                assert [block.block_id for block in blocks] == list(runner.requests[request_id].block_ids[0])
        if steps == 40:  # past two compactions of every request
            engine_core.abort_request(["1"])
    assert "1" not in done or len(done["1"]) < NEW
    assert pool.get_num_free_blocks() == free_at_start
    _, worker = sides(llm)
    kept = [done["0"], done["2"]]
    assert_equal_to_the_reference(saved["llama"], worker, [prompts[0], prompts[2]], kept, [NEW, NEW])


def test_preempted_requests_are_recomputed_and_finish_within_a_small_pool(saved):
    """Too few blocks for every request at once: vLLM preempts (frees everything, recomputes from the first token),
    the plugin starts such a request over, and every request finishes; blocks all come back."""
    llm = engine(saved["llama"], SETTINGS, num_gpu_blocks_override=8, max_num_batched_tokens=64, max_model_len=224)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    lengths, new = [120, 30, 140, 25, 110, 60], [NEW] * 6
    prompts = prompts_of(lengths, seed=5)
    got = generate(llm, prompts, new)
    scheduler, worker = sides(llm)
    assert scheduler.preemptions >= 1 and all(len(tokens) == NEW for tokens in got)
    assert pool.get_num_free_blocks() == free_at_start
    states = [*worker.retired.values(), *worker.requests.values()]
    assert any(r.recomputed for r in states)
    never = [i for i, p in enumerate(prompts) for r in states if not r.recomputed and sum(r.steps) == len(p) + NEW - 1]
    assert never, "no request ran without preemption"
    skip = [i for i in range(len(prompts)) if i not in never]
    assert_equal_to_the_reference(saved["llama"], worker, prompts, got, new, skip=skip)


@pytest.mark.parametrize(
    "options,reason",
    [
        (dict(enable_prefix_caching=True), "prefix caching is on"),
        (dict(kv_cache_dtype="fp8"), "KV cache is quantized"),
    ],
)
def test_engines_the_plugin_cannot_serve_are_refused_before_loading(saved, options, reason):
    settings = {"additional_config": {"rkv_flex": SETTINGS}}
    base = dict(
        skip_tokenizer_init=True, dtype="float32", enforce_eager=True, block_size=BLOCK, kv_cache_memory_bytes=KV_BYTES
    )
    with pytest.raises(Exception, match=reason):
        LLM(model=str(saved["llama"]), **{**base, "enable_prefix_caching": False, **options}, **settings)


def test_speculative_decoding_another_model_type_and_another_vllm_release_are_refused(saved, monkeypatch, tmp_path):
    draft = dict(method="ngram", num_speculative_tokens=2, prompt_lookup_max=3, prompt_lookup_min=1)
    with pytest.raises(Exception, match="speculative decoding is on"):
        engine(saved["llama"], SETTINGS, speculative_config=draft)
    torch.manual_seed(0)
    gpt2 = AutoConfig.for_model("gpt2", n_embd=128, n_head=4, n_layer=2, vocab_size=256, n_positions=512)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="does not compress model type 'gpt2'"):
        engine(tmp_path, SETTINGS)
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(Exception, match=r"supports vLLM 0.32.0 exactly; this is 0.33.0"):
        engine(saved["llama"], SETTINGS)


def test_bad_settings_are_refused_by_name(saved):
    with pytest.raises(Exception, match=r"does not take \['prefill_chunk'\]"):
        engine(saved["llama"], dict(SETTINGS, prefill_chunk=64))
    with pytest.raises(Exception, match="scores with"):
        engine(saved["llama"], dict(SETTINGS, policy="h2o"))


def test_the_plugin_runs_in_vllms_own_engine_process(saved):
    """vLLM's default: the engine core (scheduler and worker) in a process of its own, where the plugin loads too.
    Its tokens equal the in-process engine's, which differ from stock's (the plugin evicted there)."""
    import json
    import subprocess
    import sys
    import textwrap

    prompts = prompts_of([6, 37, 70], seed=6)
    code = textwrap.dedent(
        f"""
        import json, os
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        if __name__ == "__main__":
            llm = LLM(model={str(saved["llama"])!r}, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                      block_size={BLOCK}, enable_prefix_caching=False, kv_cache_memory_bytes={KV_BYTES},
                      additional_config={{"rkv_flex": {SETTINGS!r}}})
            params = SamplingParams(max_tokens={NEW}, temperature=0, ignore_eos=True, detokenize=False)
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in {prompts!r}], params, use_tqdm=False)
            print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    separate = json.loads(lines[-1][len("TOKENS ") :])
    assert separate == generate(engine(saved["llama"], SETTINGS), prompts, [NEW] * 3)
    assert separate != generate(engine(saved["llama"], None), prompts, [NEW] * 3)
