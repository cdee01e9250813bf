"""StructuredOutputManager: compiled grammars, cached and compiled off the engine loop.

Owns the backend (built on first use, so unconstrained servers never import xgrammar), an LRU
cache of compiled grammars keyed by `StructuredOutputSpec.cache_key`, and a small thread pool
that compiles cache misses. Equal specs in flight share one compilation.

Bounds, each a 400 (`errors.GrammarError`) for the request that hits it:
- `max_spec_chars`: the spec's text (schema JSON, regex, choices) is checked before compiling;
- `compile_timeout_s`: a request stops waiting after this long (the pool thread finishes in the
  background and its result is cached, so the next identical request is instant);
- `max_grammar_bytes`: a compiled grammar bigger than this is refused and not cached.

Does not own: per-step bitmasks (`bitmask.py`) or when a request is scheduled (`engine.py`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cogvlm_ray.contracts import StructuredOutputSpec
from cogvlm_ray.engine.structured.backend import GrammarBackend, GrammarMatcher
from cogvlm_ray.errors import GrammarError

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(
        self,
        backend_factory: Callable[[], GrammarBackend],
        *,
        max_cached_grammars: int = 64,
        compile_timeout_s: float = 10.0,
        max_spec_chars: int = 64 * 1024,
        max_grammar_bytes: int = 64 << 20,
        num_compile_threads: int = 1,
    ) -> None:
        self._backend_factory = backend_factory
        self._backend: GrammarBackend | None = None
        self.max_cached_grammars = max_cached_grammars
        self.compile_timeout_s = compile_timeout_s
        self.max_spec_chars = max_spec_chars
        self.max_grammar_bytes = max_grammar_bytes
        self._num_threads = num_compile_threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # cache + in-flight table (pool threads finish into them)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future[Any]] = {}
        self.num_compiled = 0
        self.num_cache_hits = 0

    @property
    def backend(self) -> GrammarBackend:
        with self._lock:
            if self._backend is None:
                self._backend = self._backend_factory()
            return self._backend

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def check_spec(self, spec: StructuredOutputSpec) -> None:
        """Synchronous bounds checks (call before queueing the request)."""
        if len(spec.value) > self.max_spec_chars:
            raise GrammarError(
                f"the {spec.kind.replace('_', ' ')} is {len(spec.value)} characters; "
                f"the limit is {self.max_spec_chars}"
            )

    def cached(self, spec: StructuredOutputSpec) -> Any | None:
        """The compiled grammar if it is cached (and mark it recently used), else None."""
        with self._lock:
            compiled = self._cache.get(spec.cache_key)
            if compiled is not None:
                self._cache.move_to_end(spec.cache_key)
                self.num_cache_hits += 1
            return compiled

    def compile_future(self, spec: StructuredOutputSpec) -> Future[Any]:
        """A future of the compiled grammar: a cache hit, the compile in flight, or a new one."""
        key = spec.cache_key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                done: Future[Any] = Future()
                done.set_result(compiled)
                return done
            future = self._inflight.get(key)
            if future is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._num_threads, thread_name_prefix="cogvlm-grammar"
                    )
                future = self._executor.submit(self._compile, spec)
                self._inflight[key] = future
            return future

    async def compile(self, spec: StructuredOutputSpec) -> Any:
        """Await the compiled grammar without blocking the event loop; GrammarError past the timeout."""
        future = asyncio.wrap_future(self.compile_future(spec))
        # asyncio.wait (not wait_for): a timed-out waiter must not cancel a compile others share.
        done, _ = await asyncio.wait({future}, timeout=self.compile_timeout_s)
        if not done:
            raise GrammarError(
                f"compiling the {spec.kind.replace('_', ' ')} took longer than {self.compile_timeout_s:g} s; "
                "simplify it (fewer alternatives, smaller bounds)"
            )
        return future.result()

    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        return self.backend.new_matcher(compiled)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutputSpec) -> Any:
        """Pool thread: compile, check the size bound, cache."""
        key = spec.cache_key
        try:
            backend = self.backend
            compiled = backend.compile(spec)
            num_bytes = backend.grammar_num_bytes(compiled)
            if num_bytes > self.max_grammar_bytes:
                raise GrammarError(
                    f"the compiled {spec.kind.replace('_', ' ')} needs {num_bytes >> 20} MiB; "
                    f"the limit is {self.max_grammar_bytes >> 20} MiB"
                )
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        with self._lock:
            self._inflight.pop(key, None)
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > self.max_cached_grammars:
                self._cache.popitem(last=False)
        logger.debug("compiled a %s grammar (%d bytes)", spec.kind, num_bytes)
        return compiled
