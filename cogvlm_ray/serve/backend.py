"""The ingress's `ChatBackend` over Ray Serve deployment handles.

Data path of one request: the ingress calls `Preprocessor.prepare` and passes the resulting
`DeploymentResponse` (not its value) straight into `ModelServer.generate`. Ray then moves the
`PreparedPrompt` (token ids + uint8 numpy image) from the preprocessing replica to the model
replica through the object store; the ingress never holds the pixels. The ingress stays the
one place that talks to both deployments, so each can scale on its own (CPU preprocessors,
GPU model replicas), and a model replica's batch slot is only needed once preprocessing is done.

Also owns: mapping Ray/Serve exceptions to our `errors` classes (queue full -> 429, replica
gone -> 503, errors raised in a replica -> their own class), and readiness from `serve.status()`
(cached), so `/health` and requests answer 503 quickly when no model replica runs. The
replicas hand client errors back as values (`serve/server.py`); they are raised here, in the
ingress, so no replica logs a traceback for a bad request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cogvlm_ray.api.tokenize import TokenizeJob, TokenizeResult
from cogvlm_ray.contracts import RequestOutput, SamplingParams
from cogvlm_ray.errors import CogVLMError, OverloadedError, ServiceUnavailableError
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.affinity import image_affinity_key

logger = logging.getLogger(__name__)


def to_api_error(error: BaseException) -> BaseException:
    """Our error class for an exception raised by a Serve handle call (others unchanged)."""
    from ray import exceptions as ray_exceptions
    from ray.serve import exceptions as serve_exceptions

    cause: BaseException | None = error
    for _ in range(8):  # unwrap RayTaskError(cause) chains, e.g. a failed preprocess argument
        if isinstance(cause, CogVLMError) and not isinstance(cause, ray_exceptions.RayError):
            return cause
        nxt = getattr(cause, "cause", None)
        if nxt is None or nxt is cause:
            break
        cause = nxt
    if isinstance(error, serve_exceptions.BackPressureError):
        overloaded = OverloadedError("the model queue is full; retry shortly", code="queue_full")
        overloaded.retry_after_s = 1
        return overloaded
    if isinstance(error, serve_exceptions.DeploymentUnavailableError):
        return ServiceUnavailableError(f"model deployment unavailable: {error}", code="no_replica")
    if isinstance(error, ray_exceptions.RayActorError | ray_exceptions.ActorUnavailableError):
        return ServiceUnavailableError(
            "the model replica serving this request died; retry the request", code="replica_died"
        )
    return error


class RayChatBackend:
    """`ChatBackend` for `serve/ingress.py`, over the Preprocessor and ModelServer handles."""

    def __init__(
        self,
        preprocessor: Any,
        model: Any,
        *,
        app_name: str | None,
        deployment_names: tuple[str, str],
        max_num_seqs: int,
        max_queued_requests: int,
        status_cache_s: float = 1.0,
        fail_fast_without_replicas: bool = True,
    ):
        self.preprocessor = preprocessor
        self.model = model
        self.app_name = app_name
        self.deployment_names = deployment_names
        self.max_num_seqs = max_num_seqs
        self.max_queued_requests = max_queued_requests
        self.status_cache_s = status_cache_s
        self.fail_fast_without_replicas = fail_fast_without_replicas
        self._status: tuple[float, str | None, int] = (0.0, None, 1)
        self._num_in_flight = 0
        self._refresh: asyncio.Future[str | None] | None = None

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    def capacity(self) -> int | None:
        """Requests this ingress replica admits at once: every running model replica's batch plus
        the queue bound (None: unbounded). Serve checks `max_queued_requests` only when a call is
        made, before the preprocessing argument resolves, so a burst would slip past it; counting
        here, synchronously on the event loop, makes the 429 exact."""
        if self.max_queued_requests < 0:
            return None
        return max(self._status[2], 1) * self.max_num_seqs + self.max_queued_requests

    async def check_ready(self) -> None:
        problem = await self._readiness_problem()
        if problem is not None:
            raise ServiceUnavailableError(problem, code="no_replica")

    async def generate(
        self,
        conversation: Conversation,
        sampling_params: SamplingParams,
        template_version: str | None,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        if self.fail_fast_without_replicas:
            await self.check_ready()
        else:
            await self._readiness_problem()  # refreshes the replica count behind capacity()
        capacity = self.capacity()
        if capacity is not None and self._num_in_flight >= capacity:  # no await between check and increment
            raise OverloadedError(
                f"the model queue is full ({self._num_in_flight} requests in flight); retry shortly",
                code="queue_full",
            )
        self._num_in_flight += 1
        try:
            prepared = self.preprocessor.prepare.remote(
                conversation, sampling_params.max_tokens, template_version
            )
            # The image key rides along as a kwarg so the ModelServer's request router can send
            # follow-up turns about one image to the replica that cached it (serve/router.py).
            response = self.model.options(stream=True).generate.remote(
                prepared,
                sampling_params,
                request_id,
                affinity_key=image_affinity_key(conversation.image_urls),
            )
            try:
                async for output in response:
                    if isinstance(output, CogVLMError):
                        raise output
                    yield output
            except Exception as e:
                mapped = to_api_error(e)
                if isinstance(e, CogVLMError):
                    raise
                if mapped is e:
                    logger.warning("model call failed with %s: %s", type(e).__name__, e)
                    raise
                raise mapped from None
            finally:
                # No-op when finished; otherwise aborts the request in the engine. It can re-raise
                # the call's own error (e.g. BackPressureError), which must not replace the mapped one.
                with contextlib.suppress(Exception):
                    response.cancel()
        finally:
            self._num_in_flight -= 1

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        return await self._call_preprocessor("tokenize", job)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._call_preprocessor("detokenize", token_ids)

    async def _call_preprocessor(self, method: str, *args: Any) -> Any:
        if self.fail_fast_without_replicas:
            await self.check_ready()
        try:
            result = await getattr(self.preprocessor, method).remote(*args)
        except Exception as e:
            mapped = to_api_error(e)
            if mapped is e:
                raise
            raise mapped from None
        if isinstance(result, CogVLMError):
            raise result
        return result

    async def _readiness_problem(self) -> str | None:
        """None when every deployment has a RUNNING replica, else why not (cached briefly)."""
        checked_at, problem, _ = self._status
        if time.monotonic() - checked_at < self.status_cache_s:
            return problem
        if self._refresh is None:  # one status query at a time, however many requests wait on it
            self._refresh = asyncio.ensure_future(self._refresh_status())
        refresh = self._refresh
        try:
            return await asyncio.shield(refresh)
        finally:
            if refresh.done() and self._refresh is refresh:
                self._refresh = None

    async def _refresh_status(self) -> str | None:
        _, problem, num_model_replicas = self._status
        try:
            answer = await asyncio.to_thread(self._query_status)
            if answer is not None:
                problem, num_model_replicas = answer
        except Exception:
            logger.warning("serve.status() failed; assuming the app is ready", exc_info=True)
            problem = None
        self._status = (time.monotonic(), problem, num_model_replicas)
        return problem

    def _query_status(self) -> tuple[str | None, int] | None:
        """(why not ready or None, RUNNING replicas of the first deployment = the model), or
        None when Serve lists no deployments for the app: while `serve deploy` of changed args
        builds the new version (seconds), the status is DEPLOYING with an empty deployment
        list although the old replicas still serve, so the last answer stands (a 503 then
        would fail requests during every rolling update; tests/cluster found it)."""
        from ray import serve

        applications = serve.status().applications
        app = applications.get(self.app_name) if self.app_name else next(iter(applications.values()), None)
        if app is None:
            return "the application is not deployed", 0
        if not app.deployments:
            return None
        running_counts = []
        for name in self.deployment_names:
            deployment = app.deployments.get(name)
            running = 0 if deployment is None else deployment.replica_states.get("RUNNING", 0)
            running_counts.append(running)
            if running == 0:
                return f"no {name} replica is running yet ({_describe(deployment)})", running_counts[0]
        return None, running_counts[0]


def _describe(deployment: Any) -> str:
    """Serve's own words about a deployment without running replicas (after 30 s unscheduled it
    names the resources each replica needs, e.g. a GPU the cluster does not have)."""
    if deployment is None:
        return "not deployed"
    states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
    status = str(getattr(deployment.status, "value", deployment.status))
    hint = deployment.message or "replicas are starting or waiting for resources (GPUs?); see `serve status`"
    return f"{status}, replicas {states}: {hint}"
