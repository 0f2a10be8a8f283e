"""The serving engine: caller-owned compiled decoding of a fixed number of rows, with continuous batching.

An :class:`Engine` holds, for one patched model and one batch size, the slot cache, the step buffers and the
compiled graphs (in gpt-fast's manner: the caller owns them, ``close()`` frees them). Requests queue up; each row
decodes one request; when a row finishes (an end-of-sequence id, or its own ``max_new_tokens``) the next request
takes it over: the row's slots are reset and its prompt prefilled (in chunks) while the other rows keep their
state. Refilling a row is data, not shape: the graphs never recompile for it.

Per step the host plans (compacting full rows, one graph), then two graphs run: the model's forward for one token
per row (into a logits buffer), and the choice of each row's next token with its own settings (greedy, sampled,
or filtered: three small graphs, the host picks the cheapest that serves every active row). Finished rows are
detected every ``check_every`` steps (the only device-to-host copy), or earlier when a row reaches its length.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from .cache import RKVCache, compact_layers
from .forward import feed, prompt_pieces
from .patch import batch_dependent_rope, check_length, check_prompt, make_cache, patch_record
from .policies import make_policy
from .requests import MAX_STOP_IDS, Request, build_requests
from .sampling import VARIANTS, RowSampling, cheapest_variant, choose


@dataclass
class StepBuffers:
    """Fixed-address inputs and outputs of the step graphs, updated in place, [B] per row unless noted."""

    tokens: Tensor  # [B, 1] the token each row feeds next
    positions: Tensor  # [B, 1] its position
    logits: Tensor  # [B, V] float32, the forward's output
    finished: Tensor  # bool: the row emitted a stop id (it then feeds its pad id)
    steps: Tensor  # tokens the row has generated (the random stream's counter)
    stop_ids: Tensor  # [B, MAX_STOP_IDS], -1 where unused
    pad_ids: Tensor
    sampling: RowSampling

    @classmethod
    def allocate(cls, batch: int, vocab: int, device: torch.device) -> StepBuffers:
        def static(tensor: Tensor) -> Tensor:
            torch._dynamo.mark_static_address(tensor)
            return tensor

        return cls(
            tokens=static(torch.zeros(batch, 1, dtype=torch.long, device=device)),
            positions=static(torch.zeros(batch, 1, dtype=torch.long, device=device)),
            logits=static(torch.zeros(batch, vocab, device=device)),
            finished=static(torch.ones(batch, dtype=torch.bool, device=device)),
            steps=static(torch.zeros(batch, dtype=torch.long, device=device)),
            stop_ids=static(torch.full((batch, MAX_STOP_IDS), -1, dtype=torch.long, device=device)),
            pad_ids=static(torch.zeros(batch, dtype=torch.long, device=device)),
            sampling=RowSampling.allocate(batch, device),
        )


def forward_step(model: Any, cache: RKVCache, buffers: StepBuffers) -> None:
    """One token per row through the model; the last position's logits into ``buffers.logits``. Rows that have
    finished (or hold no request) are not fed: their slots and counters stay as they are."""
    cache.shared.counters.fed.copy_(~buffers.finished)
    with cache.unfed_rows_kept():
        logits = model(input_ids=buffers.tokens, position_ids=buffers.positions, cache=cache, use_cache=True).logits
    buffers.logits.copy_(logits[:, -1])


def choose_step(buffers: StepBuffers, variant: str) -> None:
    """Each row's next token from ``buffers.logits``; finished rows stay on their pad id."""
    chosen = choose(buffers.logits, buffers.sampling, buffers.steps, variant)
    chosen = torch.where(buffers.finished, buffers.pad_ids, chosen)
    buffers.finished.logical_or_((chosen[:, None] == buffers.stop_ids).any(dim=-1))
    buffers.tokens.copy_(chosen[:, None])
    buffers.positions.add_((~buffers.finished)[:, None])
    buffers.steps.add_(1)


@dataclass
class Completion:
    """What a request produced so far: ``tokens`` new since the last event (``stream``) or all (``generate``)."""

    index: int  # the request's position in the input
    tokens: list[int]
    finished: bool


@dataclass
class _Row:
    index: int
    request: Request
    produced: list[int] = field(default_factory=list)


class Engine:
    """Compiled decoding of ``batch_size`` rows of one patched model, owned by the caller.

    ``compile=False`` runs the same steps eagerly. ``check_every`` bounds how many steps pass before finished rows
    are noticed (and refilled). ``capacity`` overrides the slots per row (the ``full`` policy needs room for the
    whole generation). ``cache`` continues from an existing slot cache of this model and batch size (a
    conversation's next turn, see :meth:`stream`). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = 1,
        *,
        compile: bool = True,
        check_every: int = 8,
        capacity: int | None = None,
        cache: RKVCache | None = None,
    ):
        record = patch_record(model)
        for name, value in (("batch_size", batch_size), ("check_every", check_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        rope = batch_dependent_rope(model)
        if rope is not None and batch_size > 1:
            raise ValueError(
                f"this model's {rope!r} RoPE picks its frequencies from the largest position in the batch, so a "
                "request decoded beside others would not equal itself alone; use batch_size=1 (or model.generate, "
                "which batches as transformers does)"
            )
        self._model = weakref.ref(model)
        self.config = record.config
        self.batch_size, self.check_every = batch_size, check_every
        self.device = model.device
        if cache is None:
            self.cache = make_cache(model)
            for layer in self.cache.attention:
                layer.capacity = capacity or self.config.capacity
            self.cache.prepare(batch_size, self.device)
        else:
            if not isinstance(cache, RKVCache) or cache.config is not record.config:
                raise ValueError("cache must be an RKVCache made for this patched model (rkv_flex.make_cache(model))")
            if cache.planner is None:
                cache.prepare(batch_size, self.device)
            cache.require_batch(batch_size)
            self.cache = cache
        vocab = model.get_output_embeddings().weight.shape[0]
        self.buffers = StepBuffers.allocate(batch_size, vocab, self.device)
        self.compiles = compile
        self._forward, self._choose = forward_step, choose_step
        if compile:  # the model's graphs of this shape, shared by its engines of this shape
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            shape = (batch_size, self.cache.capacity, model.dtype, str(self.device))
            self._forward = record.graphs.get(forward_step, shape, mode)
            self._choose = record.graphs.get(choose_step, (batch_size, vocab, str(self.device)), mode)
            if self.cache.policy.traceable:  # a user scorer compacts eagerly: its output is checked
                self.cache.compactor = record.graphs.get(compact_layers, shape, mode)
        self._warm: set = set()  # what has been compiled (and checked) before a first token
        self._lock = threading.Lock()
        self._rows: list[_Row | None] = [None] * batch_size
        self.steps_run = 0

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the engine's model no longer exists")
        patch_record(model)  # refuses a model unpatched meanwhile
        return model

    # -- lifetime -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the slot cache and the buffers (the compiled graphs belong to the patched model)."""
        self.cache = self.buffers = self._forward = self._choose = None
        self._rows = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        continue_rows: bool = False,
        order: str = "longest-first",
        **options: Any,
    ) -> list[list[int]]:
        """Each prompt's generated token ids, in input order. Options (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, ``eos_token_id``, ``pad_token_id``) take one value for all
        prompts or a list with one per prompt; unset ones come from the model's ``generation_config``. ``order``:
        see :meth:`stream`."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for event in self.stream(prompts, continue_rows=continue_rows, order=order, **options):
            outputs[event.index].extend(event.tokens)
        return outputs

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        continue_rows: bool = False,
        order: str = "longest-first",
        **options: Any,
    ) -> Iterator[Completion]:
        """Like :meth:`generate`, yielding each request's new tokens as they are found (every ``check_every``
        steps) and a final event per request when it finishes.

        ``order``: which queued request takes the next free row. ``"longest-first"`` (largest ``max_new_tokens``
        first, ties in input order) keeps the rows busy to the end: every step costs the same whatever rows are
        idle, and long requests started last would decode alone. ``"given"``: input order (first come, first
        served). Each request's tokens are the same either way.

        ``continue_rows``: prompt ``i`` continues row ``i``'s conversation (one prompt per row): it holds the whole
        conversation so far, the tokens the row has already seen are skipped and the rest are fed on top of what
        its slots kept, as transformers continues from a cache.
        """
        if self.cache is None:
            raise RuntimeError("this engine is closed")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        requests = build_requests(self.model.generation_config, prompts, **options)
        for index, request in enumerate(requests):
            check_length(self.model, len(request.prompt) + request.max_new_tokens, f"request {index}")
        if continue_rows:
            self._check_continuation(requests)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this engine is already generating in another thread; use one engine per thread")
        try:
            self.cache.shared.fed_on_device = True  # the steps' finished rows are known on the device only
            variants = {request.sampling.variant for request in requests}
            queue = list(enumerate(requests))
            if order == "longest-first" and not continue_rows:
                queue.sort(key=lambda item: -item[1].max_new_tokens)  # stable: ties stay in input order
            yield from self._run(deque(queue), variants, continue_rows)
        finally:
            self._rows = [None] * self.batch_size
            self.cache.cancel_plan()
            self.cache.shared.fed_on_device = False
            if self.cache.shared.counters is not None:  # other drivers of this cache feed every row
                self.cache.shared.counters.fed.fill_(True)
            self._lock.release()

    def _check_continuation(self, requests: list[Request]) -> None:
        if len(requests) != self.batch_size:
            raise ValueError(f"continue_rows takes one prompt per row: {self.batch_size} rows, {len(requests)} prompts")
        for row, request in enumerate(requests):
            seen = self.cache.planner.seen[row]
            if seen >= len(request.prompt):
                raise ValueError(
                    f"row {row} has seen {seen} tokens but its prompt holds {len(request.prompt)}: pass the whole "
                    "conversation so far, with at least one new token"
                )

    @torch.no_grad()
    def _run(self, queue: deque, variants: set[str], continue_rows: bool = False) -> Iterator[Completion]:
        if continue_rows:
            for row in range(self.batch_size):
                yield from self._place(row, *queue.popleft(), variants, continuing=True)
        while True:
            yield from self._refill(queue, variants)
            active = [row for row in self._rows if row is not None]
            if not active:
                return
            variant = cheapest_variant([row.request.sampling for row in active])
            remaining = min(row.request.max_new_tokens - len(row.produced) for row in active)
            steps = min(self.check_every, remaining)
            tokens = [self._step(variant) for _ in range(steps)]
            yield from self._collect(torch.stack(tokens, dim=1).cpu())

    def _step(self, variant: str) -> Tensor:
        self.cache.begin_step(1, tuple(r for r, row in enumerate(self._rows) if row is not None))
        self._forward(self.model, self.cache, self.buffers)
        self.cache.step_ran()
        self._choose(self.buffers, variant)
        self.steps_run += 1
        return self.buffers.tokens[:, 0].clone()

    def _warm_up(self, variants: set[str]) -> None:
        """Compile (and check) every graph decoding will need, on the cache's and buffers' own tensors (restored
        afterwards), so a stream never stops mid-answer to compile: the step, the token choice of each sampling
        variant in use, and the compaction of all rows (and of one row, when rows fill out of phase). Runs after a
        prefill: the graphs bake in the model's attention scaling, which the first forward reveals."""
        needed = {"forward", "compact all", *variants}
        if self.batch_size > 1:
            needed.add("compact one")
        if not self.cache.policy.traceable or not self.cache.evicts:
            needed -= {"compact all", "compact one"}
        missing = needed - self._warm if self.compiles else set()
        if not missing:
            return
        with preserved(self.cache, self.buffers):
            if "forward" in missing:
                self.cache.choose_decode_kernels()

                def step() -> None:
                    self.cache.shared.counters.used.clamp_(max=self.cache.capacity - 1)  # full rows write in bounds
                    self._forward(self.model, self.cache, self.buffers)

                until_no_new_graph(step)
            for variant in missing & set(VARIANTS):
                until_no_new_graph(self._choose, self.buffers, variant)
            cache, rows = self.cache, {"compact all": None, "compact one": torch.tensor([0], device=self.device)}
            for name in missing & set(rows):
                until_no_new_graph(
                    cache.compactor, cache.attention, cache.shared.counters, self.config.budget, rows[name]
                )
        self._warm |= missing

    def _refill(self, queue: deque, variants: set[str]) -> Iterator[Completion]:
        """Give every free row the next queued request."""
        for row in range(self.batch_size):
            while self._rows[row] is None and queue:
                yield from self._place(row, *queue.popleft(), variants)

    def _place(
        self, row: int, index: int, request: Request, variants: set[str], continuing: bool = False
    ) -> Iterator[Completion]:
        """Prefill ``request`` on ``row`` (reset first unless ``continuing``) and choose its first token; before
        the first token of the stream, compile what decoding will need."""
        first = self._start(row, request, continuing)
        self._warm_up(variants)
        if first in request.stop_ids or request.max_new_tokens == 1:
            yield Completion(index, [first], True)
            self._finish_row(row)
        else:
            self._rows[row] = _Row(index, request, [first])
            yield Completion(index, [first], False)

    def _start(self, row: int, request: Request, continuing: bool) -> int:
        cache, buffers, model = self.cache, self.buffers, self.model
        seen = cache.planner.seen[row] if continuing else 0
        if not continuing:
            cache.reset_rows([row])
        prompt = torch.tensor([request.prompt], device=self.device)
        with cache.feeding(row):
            pieces = prompt_pieces(prompt.shape[1] - seen, self.config)
            logits = feed(model, cache, prompt, torch.ones_like(prompt), seen, pieces)
        buffers.sampling.set_row(row, request.sampling)
        buffers.steps[row] = 0
        one_row = RowSampling(*(getattr(buffers.sampling, name)[row : row + 1] for name in _SAMPLING_FIELDS))
        first = choose(logits, one_row, buffers.steps[row : row + 1], request.sampling.variant)
        buffers.tokens[row, 0] = first[0]
        buffers.positions[row, 0] = len(request.prompt)
        buffers.steps[row] = 1
        buffers.stop_ids[row] = -1
        buffers.stop_ids[row, : len(request.stop_ids)] = torch.tensor(request.stop_ids, dtype=torch.long)
        buffers.pad_ids[row] = request.pad_id
        buffers.finished[row] = False
        return int(first[0])

    def _collect(self, tokens: Tensor) -> Iterator[Completion]:
        """Hand each active row's new tokens to its request, up to its stop id or length; free finished rows (the
        device stopped feeding them at their stop id: the host takes their counters from it)."""
        finishing = [
            row
            for row, state in enumerate(self._rows)
            if state is not None and any(token in state.request.stop_ids for token in tokens[row].tolist())
        ]
        if finishing:
            self.cache.sync_rows(finishing)
        for row, state in enumerate(self._rows):
            if state is None:
                continue
            new = []
            for token in tokens[row].tolist():
                new.append(token)
                if token in state.request.stop_ids or len(state.produced) + len(new) == state.request.max_new_tokens:
                    state.produced.extend(new)
                    yield Completion(state.index, new, True)
                    self._finish_row(row)
                    break
            else:
                state.produced.extend(new)
                yield Completion(state.index, new, False)

    def _finish_row(self, row: int) -> None:
        self._rows[row] = None
        self.buffers.finished[row] = True
        self.buffers.pad_ids[row] = 0


ORDERS = ("longest-first", "given")
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "greedy", "seed")


def until_no_new_graph(graph: Any, *args: Any, tries: int = 3) -> None:
    """Call a compiled function until a call compiles nothing. A first call can leave Python state its guards read
    otherwise than it found it (the ``kernels`` package's context variable, which transformers' attention layers
    use, stays set after a compiled forward), and the second call then compiles once more. Clearing that variable
    instead races with eager forwards in other threads, which read it between their set and reset."""
    for _ in range(tries):
        before = counters["stats"]["unique_graphs"]
        graph(*args)
        if counters["stats"]["unique_graphs"] == before:
            return


@contextlib.contextmanager
def preserved(cache: RKVCache, buffers: StepBuffers) -> Iterator[None]:
    """Whatever runs inside leaves the cache's slots, states and counters and the step buffers as they were."""
    tensors = [tensor for layer in cache.attention for tensor in layer.tensors()]
    tensors += [tensor for state in cache.states for tensor in state.tensors()]
    counters = cache.shared.counters
    tensors += [counters.used, counters.seen, counters.query_valid, counters.fed]
    tensors += [value for value in vars(buffers).values() if isinstance(value, Tensor)]
    tensors += list(vars(buffers.sampling).values())
    saved = [tensor.clone() for tensor in tensors]
    try:
        yield
    finally:
        for tensor, copy in zip(tensors, saved, strict=True):
            tensor.copy_(copy)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    streamer: Any = None,
    compile: bool = True,
    cache: RKVCache | None = None,
    return_cache: bool = False,
    **options: Any,
) -> Tensor | tuple[Tensor, RKVCache]:
    """Decode a batch with the patched model's slot cache; returns [B, prompt + new] ids like ``model.generate``.

    A thin wrapper over an :class:`Engine` kept by the patched model (released by ``unpatch_model``): each row is
    generated exactly as it would be alone, without its left padding (which takes no slots). Options as for
    :meth:`Engine.generate`; rows that finish early are padded with their pad id, as transformers does.

    Conversations: ``return_cache=True`` also returns the slot cache; pass it back as ``cache`` with ``input_ids``
    holding the whole conversation so far, and each row continues from what its slots kept (the tokens the cache
    has seen are not fed again), as ``model.generate(..., cache=cache)`` does.
    """
    record = patch_record(model)
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, prompt length]")
    check_prompt(input_ids, attention_mask)
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tensor is not None and tensor.device != model.device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {model.device}; move it first")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("a streamer takes one sequence: stream a batch with Engine.stream instead")
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
    requests = build_requests(model.generation_config, prompts, **options)
    capacity = record.config.capacity
    if not make_policy(record.config).evicts:  # a cache that never evicts holds everything
        longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
        capacity = max(capacity, -(-longest // 128) * 128)
    outputs: list[list[int]] = [[] for _ in prompts]
    batch = input_ids.shape[0]
    with record.lock:
        if cache is not None or return_cache:  # a conversation's own cache, never pooled
            engine = Engine(model, batch, compile=compile, capacity=capacity, cache=cache)
        else:
            key = (batch, model.dtype, model.device, compile, capacity)
            if key not in record.engines:
                record.engines[key] = Engine(model, batch, compile=compile, capacity=capacity)
            engine = record.engines[key]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for event in engine.stream(prompts, continue_rows=cache is not None, **options):
            outputs[event.index].extend(event.tokens)
            if streamer is not None and event.tokens:
                streamer.put(torch.tensor(event.tokens))
    if streamer is not None:
        streamer.end()
    width = max(len(tokens) for tokens in outputs)
    new = torch.tensor(
        [tokens + [request.pad_id] * (width - len(tokens)) for tokens, request in zip(outputs, requests, strict=True)],
        device=input_ids.device,
    )
    output = torch.cat([input_ids, new], dim=1)
    return (output, engine.cache) if return_cache else output
