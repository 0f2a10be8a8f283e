"""rkv_flex inside vLLM: an out-of-tree plugin (vLLM's ``vllm.general_plugins`` entry point) that compresses each
request's KV cache in its own pages and gives freed blocks back to vLLM's pool.

``lengths`` and ``pages`` are plain torch and import without vLLM (and without transformers): the rule for how many
slots a request holds, and compaction in place inside a paged cache with rkv_flex's own policies.
"""


def register() -> None:
    """vLLM's general-plugin entry point: patch vLLM once per process. Each engine turns the plugin on with
    ``additional_config={"rkv_flex": {...}}``; without it vLLM runs as it is."""
    from .hooks import install

    install()
