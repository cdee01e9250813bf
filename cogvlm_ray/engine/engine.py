"""Engine: the async API over scheduler + runner + output processing (no Ray, no HTTP).

`add_request` validates synchronously and returns an async iterator of `RequestOutput`
deltas. A request with `n` choices becomes n engine requests (ids `<id>#<i>`) whose deltas
share that one iterator, tagged with `index`; choice 0 prefills the prompt and the others
are admitted once it is cached, so they reuse its blocks (docs/engine.md, "n > 1"). A background task runs `step()` (schedule -> run -> update) in a loop; the forward
pass runs on one dedicated worker thread, so the event loop keeps streaming tokens and
accepting requests while the model computes.

Threading rule: scheduler, output processor and request state are touched only on the event
loop thread; the worker thread only runs `ModelRunner.execute` on a `SchedulerOutput` built
before it starts. That is why `abort` is deferred: it is applied at the top of the next loop
iteration (the KV blocks of a request in flight are never freed under a running forward),
which frees the slot and KV within one step.

Structured output: a request with a grammar spec joins the scheduler only once its grammar is
compiled (a cache hit joins at once; a miss compiles on the manager's thread pool while the
loop keeps stepping the other streams). A compile error ends the request's stream with a
GrammarError (400) before any token. After each step the request's matcher accepts the sampled
token; a grammar that terminates ends the request with "stop".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cogvlm_ray.contracts import PreparedPrompt, RequestOutput, SamplingParams, check_context_window
from cogvlm_ray.engine.config import EngineConfig, resolve_attention_backend
from cogvlm_ray.engine.cuda_graphs import GRAPH_SAFE_BACKENDS, DecodeGraphRunner, cuda_graphs_unavailable
from cogvlm_ray.engine.image_cache import ImageFeatureCache
from cogvlm_ray.engine.kv_cache import BlockManager, allocate_kv_caches, num_kv_blocks_for
from cogvlm_ray.engine.outputs import OutputProcessor
from cogvlm_ray.engine.request import Request
from cogvlm_ray.engine.runner import ModelRunner, input_device
from cogvlm_ray.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from cogvlm_ray.engine.stats import EngineStats
from cogvlm_ray.engine.structured.manager import StructuredOutputManager
from cogvlm_ray.engine.structured.xgrammar_backend import XGrammarBackend
from cogvlm_ray.engine.validation import validate_prompt, validate_sampling_params
from cogvlm_ray.errors import (
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
    PromptTooLongError,
    ServiceUnavailableError,
)

logger = logging.getLogger(__name__)


def decode_graph_mode(config: EngineConfig, attention_backend: str, kv_caches: list) -> str:
    """How decode steps run: `capture` (CUDA graphs) or `off` (eager; the reason is logged).

    Tests force `padded`: the graph path's buffers and padding, run eagerly without capture.
    """
    devices = {cache.device for pair in kv_caches for cache in pair}
    why_not = cuda_graphs_unavailable(config.enforce_eager, devices, attention_backend)
    if why_not is not None:
        logger.info("CUDA graphs off: %s", why_not)
        return "off"
    return "capture"


def attention_backend_of(model: Any) -> str:
    """The attention backend the model's decoder layers run ("?" for a model without layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return getattr(layers[0].self_attn, "attention_backend", "?") if len(layers) else "?"


class Engine:
    """Continuous-batching CogVLM2 generation over a paged KV cache (see the module docstring).

    `model` is a loaded `CogVLM2ForCausalLM` (anything with `model_config`, `kv_cache_layout`,
    `encode_images`, `forward_flat`, `compute_logits`, and optionally `stop_token_ids`); the KV
    cache is allocated here, once.
    Call the public methods from the event-loop thread that runs the engine.
    """

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        config.validate()
        model_config = model.model_config
        self.model_config = model_config
        self.max_model_len = config.max_model_len or model_config.max_context_len
        # The checkpoint's stop ids, read by `load_model` (config + generation_config.json).
        self.eos_token_ids = tuple(getattr(model, "stop_token_ids", ()) or model_config.eos_token_ids)

        layout = model.kv_cache_layout()
        image_device = input_device(model)  # where the image features (and their cache) live
        num_blocks = num_kv_blocks_for(
            config, layout, model_config.num_key_value_heads, model_config.head_dim,
            reserved_bytes={image_device: config.image_cache_bytes},
        )  # fmt: skip
        # One block more than the block manager hands out: the scratch block, where the padding
        # rows of a CUDA-graph decode batch write their K/V (`cuda_graphs.py`).
        kv_caches = allocate_kv_caches(
            layout, num_blocks + 1, config.block_size, model_config.num_key_value_heads, model_config.head_dim
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.image_cache = ImageFeatureCache(config.image_cache_bytes)
        self.scheduler = Scheduler(
            config, self.block_manager, self.eos_token_ids, self.max_model_len,
            is_image_cached=self.image_cache.__contains__,
        )  # fmt: skip
        self.attention_backend = resolve_attention_backend(config.attention_backend, image_device.type)
        if hasattr(model, "set_attention_backend"):
            model.set_attention_backend(self.attention_backend)
        self.runner = ModelRunner(
            model, kv_caches, config.block_size, self.image_cache, self.eos_token_ids,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )  # fmt: skip
        self.outputs = OutputProcessor(tokenizer)
        self.use_cuda_graphs = self._setup_decode_graphs(model, kv_caches, scratch_block=num_blocks)
        self.structured = StructuredOutputManager(
            lambda: XGrammarBackend(tokenizer, model_config.vocab_size, self.eos_token_ids),
            max_cached_grammars=config.max_cached_grammars,
            compile_timeout_s=config.grammar_compile_timeout_s,
            max_spec_chars=config.max_grammar_spec_chars,
            max_grammar_bytes=config.max_grammar_bytes,
        )
        self._compiling: dict[str, Request] = {}
        """Requests waiting for their grammar (not in the scheduler yet)."""
        self._compile_tasks: set[asyncio.Task[None]] = set()
        logger.info(
            "engine ready: %d KV blocks x %d tokens, max_model_len %d, eos ids %s, attention %s, CUDA graphs %s",
            num_blocks, config.block_size, self.max_model_len, self.eos_token_ids, self.attention_backend,
            self.use_cuda_graphs,
        )  # fmt: skip

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cogvlm-engine")
        self._loop_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._pending_aborts: list[str] = []
        self._dead: BaseException | None = None
        self._accepting = True
        self._stopping = False
        self._stats = EngineStats()

    def _setup_decode_graphs(self, model: Any, kv_caches: list, scratch_block: int) -> bool:
        """Give the runner a `DecodeGraphRunner` and capture its graphs where they can run; returns
        `use_cuda_graphs`. `decode_graph_mode` decides (tests force the uncaptured padded path)."""
        backend = attention_backend_of(model)
        mode = decode_graph_mode(self.config, backend, kv_caches)
        if mode == "off":
            return False
        graphs = DecodeGraphRunner(
            model, kv_caches, block_size=self.config.block_size, max_num_seqs=self.config.max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // self.config.block_size),
            scratch_block=scratch_block, capture=mode == "capture",
            graph_safe=backend in GRAPH_SAFE_BACKENDS,
        )  # fmt: skip
        graphs.capture()
        self.runner.decode_graphs = graphs
        return graphs.num_graphs > 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # ---- public API -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background step loop (idempotent)."""
        if self._loop_task is None and not self._stopping:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run_loop(), name="cogvlm-engine-loop"
            )

    def add_request(
        self, prepared: PreparedPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; returns its stream of deltas.

        With n == 1 the last delta has finish_reason. With n > 1 the deltas of the n choices
        interleave (`RequestOutput.index`), each choice ends with its own finish_reason, and the
        stream ends when all have. Raises synchronously: InvalidRequestError / PromptTooLongError
        for bad input, OverloadedError when the waiting queue is full, EngineDeadError /
        ServiceUnavailableError when the engine cannot take work. Closing or cancelling the
        iterator aborts the request (all its choices).
        """
        self.check_health()
        if not self._accepting:
            raise ServiceUnavailableError("engine is shutting down")
        sampling_params.validate(max_n=self.config.max_n)
        validate_sampling_params(sampling_params, self.model_config.vocab_size)
        validate_prompt(prepared, self.model_config)
        check_context_window(prepared.num_prompt_tokens, sampling_params.max_tokens, self.max_model_len)
        total = prepared.num_prompt_tokens + sampling_params.max_tokens
        if total > self.kv_capacity_tokens:
            raise PromptTooLongError(
                f"prompt + max_tokens ({total} tokens) exceeds the KV cache capacity of {self.kv_capacity_tokens}"
            )
        n = sampling_params.n
        choice_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        if any(self._is_live(i) for i in {request_id, *choice_ids}):
            raise InvalidRequestError(f"duplicate request id {request_id!r}", param="request_id")
        if sampling_params.structured is not None:
            self.structured.check_spec(sampling_params.structured)
        if self.scheduler.num_waiting + len(self._compiling) + n > self.config.max_waiting:
            raise OverloadedError(f"engine queue is full ({self.config.max_waiting} waiting requests)")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        leader: Request | None = None
        requests: list[Request] = []
        for index, choice_id in enumerate(choice_ids):
            request = Request(
                request_id=choice_id,
                prompt_token_ids=list(prepared.input_ids),
                token_type_ids=list(prepared.token_type_ids),
                sampling_params=choice_params(sampling_params, index),
                image=prepared.image,
                image_hash=prepared.image_hash,
                group_id=request_id if n > 1 else None,
                choice_index=index,
                prefill_leader=leader,
            )
            if self.config.enable_prefix_caching and leader is None:
                leader = request
            self.outputs.add(request, queue)
            requests.append(request)
        if sampling_params.structured is None:
            for request in requests:
                self.scheduler.add_request(request)
            self._wake()
        else:
            self._add_constrained(requests)
        return self._iterate(queue, request_id, n)

    def _is_live(self, request_id: str) -> bool:
        """Whether an unfinished request (or n > 1 group) already uses this id."""
        return (
            request_id in self.scheduler.requests
            or request_id in self.outputs.streams
            or bool(self._choice_ids(request_id))
        )

    def _choice_ids(self, request_id: str) -> list[str]:
        """The engine ids of the caller's request: itself, or its n choices."""
        waiting = [*self.scheduler.requests.items(), *self._compiling.items()]
        return [rid for rid, r in waiting if r.output_request_id == request_id]

    def abort(self, request_id: str) -> None:
        """Abort a request (all its choices); its slots and KV are freed before the next step runs."""
        self._pending_aborts.append(request_id)
        self._wake()

    def _add_constrained(self, requests: list[Request]) -> None:
        """Schedule now on a grammar-cache hit; otherwise compile off the loop, then schedule.

        `requests` are the choices of one request (one matcher each, one shared grammar)."""
        spec = requests[0].sampling_params.structured
        assert spec is not None
        compiled = self.structured.cached(spec)
        if compiled is not None:
            self._schedule_with_grammar(requests, compiled)
            return
        for request in requests:
            self._compiling[request.request_id] = request
        task = asyncio.get_running_loop().create_task(self._compile_then_schedule(requests))
        self._compile_tasks.add(task)
        task.add_done_callback(self._compile_tasks.discard)

    async def _compile_then_schedule(self, requests: list[Request]) -> None:
        spec = requests[0].sampling_params.structured
        assert spec is not None
        try:
            compiled = await self.structured.compile(spec)
        except Exception as exc:
            if not isinstance(exc, InvalidRequestError):
                logger.exception("grammar compilation failed for %s", requests[0].output_request_id)
                exc = InvalidRequestError(f"could not compile the grammar: {exc}", param="response_format")
            for request in requests:
                if self._compiling.pop(request.request_id, None) is not None:
                    self.outputs.fail(request.request_id, exc)
            return
        live = [r for r in requests if self._compiling.pop(r.request_id, None) is not None]
        if live:  # not aborted while compiling
            self._schedule_with_grammar(live, compiled)

    def _schedule_with_grammar(self, requests: list[Request], compiled: Any) -> None:
        for request in requests:
            request.grammar = self.structured.new_matcher(compiled)
            self.scheduler.add_request(request)
        self._wake()

    def get_stats(self) -> EngineStats:
        stats = dataclasses.replace(self._stats)
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting
        stats.num_waiting_for_kv = self.scheduler.num_waiting_for_kv
        stats.kv_cache_usage = self.block_manager.usage
        stats.image_cache_hits = self.image_cache.num_hits
        stats.image_cache_queries = self.image_cache.num_queries
        stats.image_cache_bytes = self.image_cache.num_bytes
        stats.prefix_cache_hit_tokens = self.scheduler.num_cached_prompt_tokens
        stats.is_alive = self._dead is None
        return stats

    def check_health(self) -> None:
        """Raise EngineDeadError if the step loop died."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        if self._loop_task is not None and self._loop_task.done() and not self._stopping:
            raise EngineDeadError("engine loop exited unexpectedly")

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to `timeout_s`, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self.scheduler.has_unfinished_requests() and time.monotonic() < deadline and self._dead is None:
            await asyncio.sleep(0.01)
        pending = [*self.scheduler.requests.values(), *self._compiling.values()]
        for request_id in dict.fromkeys(r.output_request_id for r in pending):
            self.abort(request_id)
        if self._loop_task is None or self._loop_task.done():
            self._apply_aborts()  # no loop will get to them
        self._stopping = True
        self._wake()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self.structured.shutdown()

    # ---- the loop -------------------------------------------------------------------------
    async def step(self) -> None:
        """One iteration: schedule -> run (worker thread) -> update."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            await asyncio.sleep(0.001)  # nothing fits this step (only possible transiently)
            return
        loop = asyncio.get_running_loop()
        runner_output = await loop.run_in_executor(self._executor, self.runner.execute, scheduler_output)
        self._record_image_cache_hits(runner_output)
        for update in self.scheduler.update_from_output(scheduler_output, runner_output):
            request = update.request
            logprob = runner_output.logprobs.get(request.request_id)
            finished = update.finished
            if request.grammar is not None and self._advance_grammar(request, update.new_token_ids):
                finished = True
            if self.outputs.process(request, update.new_token_ids, finished, logprob):
                if request.is_finished:
                    request.finish_reason = "stop"  # a stop string on the last allowed token
                else:
                    self.scheduler.finish_request(request.request_id, "stop")
            if request.is_finished:
                self.runner.release(request.request_id)
        self._record_step(scheduler_output, runner_output)

    def _record_image_cache_hits(self, runner_output: RunnerOutput) -> None:
        """The first observation per request counts (a later chunk past the image changes nothing)."""
        for request_id, hit in runner_output.image_cache_hits.items():
            request = self.scheduler.requests.get(request_id)
            if request is not None and request.image_cache_hit is None:
                request.image_cache_hit = hit

    def _advance_grammar(self, request: Request, token_ids: list[int]) -> bool:
        """Feed the sampled ids to the request's matcher; True when that finished the request."""
        assert request.grammar is not None
        for token_id in token_ids:
            if not request.grammar.accept_token(token_id):
                # The bitmask allows only grammar tokens, so this is a bug; end this request only.
                logger.error("%s: token %d rejected by its grammar", request.request_id, token_id)
                if not request.is_finished:
                    self.scheduler.finish_request(request.request_id, "abort")
                return True
        if request.grammar.is_terminated() and not request.is_finished:
            self.scheduler.finish_request(request.request_id, "stop")  # e.g. eos under ignore_eos
            return True
        return False

    def _record_step(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> None:
        stats = self._stats
        stats.batch_size = len(scheduler_output.scheduled)
        stats.num_prefill_tokens = scheduler_output.num_prefill_tokens
        stats.num_decode_tokens = scheduler_output.num_decode_tokens
        stats.total_prompt_tokens += scheduler_output.num_prefill_tokens
        stats.total_generated_tokens += len(runner_output.sampled_token_ids)
        stats.num_steps += 1

    async def _run_loop(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                self._apply_aborts()
                if not self.scheduler.has_unfinished_requests():
                    if self._stopping:
                        return
                    self._wakeup.clear()
                    if self._pending_aborts:
                        continue
                    await self._wakeup.wait()
                    continue
                await self.step()
        except Exception as exc:
            logger.exception("engine loop died")
            self._dead = exc
            self.outputs.fail_all(EngineDeadError(f"engine loop died: {exc!r}"))

    def _apply_aborts(self) -> None:
        while self._pending_aborts:
            for request_id in self._choice_ids(self._pending_aborts.pop()):
                request = self.scheduler.finish_request(request_id, "abort") or self._compiling.pop(
                    request_id, None
                )
                if request is not None:
                    self.runner.release(request_id)
                    self.outputs.finish(request, "abort")

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _iterate(
        self, queue: asyncio.Queue[RequestOutput | BaseException], request_id: str, num_choices: int
    ) -> AsyncIterator[RequestOutput]:
        await self.start()
        num_finished = 0
        try:
            while num_finished < num_choices:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                num_finished += item.finished
                yield item
        finally:
            if num_finished < num_choices:
                self.abort(request_id)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """One choice's parameters: n = 1, and choice i of a seeded request uses seed + i."""
    if params.n == 1:
        return params
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)
