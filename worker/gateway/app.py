"""Owns: the gateway's HTTP routes (a Starlette app): OpenAI's /v1/chat/completions, /v1/completions and
/v1/models, plus /health and /metrics; API keys, the body size limit, CORS, and the SSE response.
Changed by: the gateway; errors.py holds the error table, openai_schema.py the bodies, relay.py the queue side.
Thread-safety: one app per event loop; it keeps no state between requests but its Redis client and metrics.

The gateway is one more producer: each completion choice is submitted through the SDK onto the
model's request stream and its reply stream is relayed to the client. Nothing lives only in a
gateway, so any number of them can run side by side behind a load balancer.

Why Starlette + uvicorn: Starlette is the small, well-kept ASGI toolkit FastAPI is built on
(routing, requests, CORS middleware) without a framework's opinions on top; uvicorn is the
reference ASGI server (httptools/h11, asyncio). The hot path — an SSE stream of tokens — is a
plain ASGI send loop (`_SSEResponse`), so the gateway controls when the client is noticed gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
import redis
import redis.asyncio
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from producer_sdk import AsyncProducer, ProtocolError
from producer_sdk.connection import make_async_client
from producer_sdk.keys import Keys, check_model_name

from ..settings import GatewaySettings, Settings
from .errors import ApiError, error_body
from .metrics import GatewayMetrics
from .openai_schema import ChatCompletionRequest, CompletionRequest, parse_body
from .relay import SSE_DONE, Job, JobSpec

__all__ = ["create_app", "load_api_keys"]

log = logging.getLogger("layermux.gateway")

_T = TypeVar("_T")
CANCEL_RETRY_S: Final = 0.1

JSON_TYPE: Final = "application/json"
SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]


def load_api_keys(g: GatewaySettings) -> frozenset[str]:
    """api_keys plus the non-empty, non-comment lines of api_keys_file. Raises OSError naming the file."""
    keys = set(g.api_keys)
    if g.api_keys_file is not None:
        text = Path(g.api_keys_file).read_text(encoding="utf-8")
        keys.update(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return frozenset(keys)


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    data = body.model_dump_json().encode() if isinstance(body, BaseModel) else orjson.dumps(body)
    return Response(data, status, headers=headers, media_type=JSON_TYPE)


def _error(e: ApiError) -> Response:
    return _json(error_body(e), e.status, e.headers)


class _Gateway:
    """The app's state: settings, one Redis client shared by the producer and the reads, metrics."""

    def __init__(self, settings: Settings, api_keys: frozenset[str]) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.g = settings.gateway
        self.keys = Keys(settings.key_prefix)
        self.api_keys = api_keys
        self.metrics = GatewayMetrics()
        self.redis: redis.asyncio.Redis = make_async_client(
            settings.redis_url, mode=settings.redis_mode, urls=settings.redis_urls,
            sentinel_master=settings.sentinel_master)
        self.producer = AsyncProducer(prefix=settings.key_prefix, client=self.redis)
        self.started = int(time.time())

    async def aclose(self) -> None:
        await self.redis.aclose()

    # -- plumbing --------------------------------------------------------------------------------------

    def route(self, name: str, handler: Callable[[Request], Awaitable[Response]], *,
              auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: API key check, OpenAI-shaped errors (never a traceback), request counting."""

        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self._check_key(request)
                response = await handler(request)
            except ApiError as e:
                response = _error(e)
            except ClientDisconnect:  # gone while sending its body: nothing was queued, nobody to answer
                response = Response(status_code=499)
            except redis.RedisError as e:
                log.warning("%s: Redis unavailable: %s", name, e)
                response = _error(ApiError(503, f"the queue (Redis) is unavailable: {type(e).__name__}",
                                           "server_error", "queue_unavailable"))
            except Exception:
                incident = secrets.token_hex(6)
                log.exception("%s: internal error (incident %s)", name, incident)
                response = _error(ApiError(500, f"internal error in the gateway (incident {incident}, logged)",
                                           "server_error", "internal_error"))
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    def _check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.api_keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    async def _read_json(self, request: Request) -> object:
        limit = self.g.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body: expected at most {limit} bytes, found {declared}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body: expected at most {limit} bytes, found more",
                               code="request_too_large")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, f"request body: expected a JSON object, found invalid JSON ({e})") from None

    async def _default_max_tokens(self, model: str) -> int:
        raw = await self.redis.hget(self.keys.limits(model), "max_tokens")  # type: ignore[misc]
        limit = int(raw) if raw is not None and raw.isdigit() else self.g.default_max_tokens
        return min(self.g.default_max_tokens, limit)

    # -- completions -----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await self._read_json(request))
        if req.logprobs:
            raise ApiError(400, "logprobs: not supported by layermux", param="logprobs")
        return await self._complete(request, "chat", req, [{"messages": req.chat()}], req.requested_max_tokens())

    async def completions(self, request: Request) -> Response:
        req = parse_body(CompletionRequest, await self._read_json(request))
        for name in ("echo", "logprobs", "suffix"):
            if getattr(req, name):
                raise ApiError(400, f"{name}: not supported by layermux", param=name)
        return await self._complete(request, "completion", req, req.prompts(), req.requested_max_tokens())

    async def _complete(self, request: Request, kind: Any, req: ChatCompletionRequest | CompletionRequest,
                        prompts: list[dict[str, Any]], max_tokens: int | None) -> Response:
        arrived = time.perf_counter()
        try:
            check_model_name(req.model)
        except ValueError:
            raise ApiError(404, f"the model {req.model!r} does not exist (layermux model names are "
                           "[A-Za-z0-9._-]{1,64})", code="model_not_found", param="model") from None
        if max_tokens is not None:
            return await self._run(request, kind, req, prompts, max_tokens, arrived)
        try:
            return await self._run(request, kind, req, prompts, await self._default_max_tokens(req.model), arrived)
        except ApiError as e:
            # No max_tokens given and the default does not fit beside the prompt: use what is left of
            # the context, as vLLM does (not with a request_id, which names the refused request).
            fit = _room_left(e) if req.request_id is None else None
            if fit is None:
                raise
            return await self._run(request, kind, req, prompts, fit, arrived)

    async def _run(self, request: Request, kind: Any, req: ChatCompletionRequest | CompletionRequest,
                   prompts: list[dict[str, Any]], max_tokens: int, arrived: float) -> Response:
        spec = JobSpec(kind=kind, model=req.model, prompts=prompts, n=req.n or 1, sampling=req.sampling(max_tokens),
                       seed=req.seed, request_id=req.request_id, include_usage=req.include_usage,
                       retry_after_s=self.g.retry_after_s)
        m = self.metrics
        job = await Job.submit(self.producer, spec)
        headers = {"x-layermux-request-ids": ",".join(job.request_ids)}
        if req.stream:
            await self._until_first_event(request, job)
            job.on_first_token = lambda: m.ttft.labels(req.model).observe(time.perf_counter() - arrived)
            return _SSEResponse(job, m, arrived, headers)
        m.in_progress.inc()
        try:
            body = await _unless_disconnected(request.receive, job.response(), job, m)
        finally:
            m.in_progress.dec()
        if body is None:
            return Response(status_code=499)  # nobody reads it; counted as a disconnect
        m.tokens.labels(req.model).inc(body.usage.completion_tokens)
        m.e2e.labels(req.model).observe(time.perf_counter() - arrived)
        return _json(body, headers=headers)

    async def _until_first_event(self, request: Request, job: Job) -> None:
        """Wait for every choice's first event (status not sent yet), cancelling if the client leaves."""
        ok = await _unless_disconnected(request.receive, _true_after(job.start_stream()), job, self.metrics)
        if ok is None:
            raise ApiError(499, "the client closed the connection", code="client_closed_request")

    # -- models, health, metrics ----------------------------------------------------------------------

    async def served_models(self) -> dict[str, int | None]:
        """Model name -> context length (n_ctx) of every model whose limits hash exists (a worker serves it)."""
        names = sorted(n.decode() if isinstance(n, bytes) else str(n)
                       for n in await self.redis.smembers(self.keys.models()))  # type: ignore[misc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.exists(self.keys.limits(n))
                pipe.hget(self.keys.limits(n), "n_ctx")
            replies = await pipe.execute()
        out: dict[str, int | None] = {}
        for i, n in enumerate(names):
            present, n_ctx = replies[2 * i], replies[2 * i + 1]
            if present:
                out[n] = int(n_ctx) if n_ctx is not None and n_ctx.isdigit() else None
        return out

    def _model_object(self, name: str, n_ctx: int | None) -> dict[str, Any]:
        # max_model_len: vLLM's field for the context length, which some clients read.
        return {"id": name, "object": "model", "created": self.started, "owned_by": "layermux", "max_model_len": n_ctx}

    async def list_models(self, request: Request) -> Response:
        served = await self.served_models()
        return _json({"object": "list", "data": [self._model_object(n, c) for n, c in served.items()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        served = await self.served_models()
        if name not in served:
            raise ApiError(404, f"the model {name!r} does not exist (no worker serves it)", code="model_not_found",
                           param="model")
        return _json(self._model_object(name, served[name]))

    async def health(self, request: Request) -> Response:
        """200 with the live workers per model while Redis answers; 503 when it does not.

        No live worker is still 200: the gateway can queue (a lag-based autoscaler starts workers
        for the backlog), so taking it out of a load balancer then would only refuse work.
        """
        try:
            raw = await self.redis.hgetall(self.keys.workers())  # type: ignore[misc]
            served = await self.served_models()
        except redis.RedisError as e:
            return _json({"status": "unavailable", "redis": f"{type(e).__name__}: {e}"}, 503)
        now = time.time()
        live: dict[str, int] = {m: 0 for m in served}
        n_live = 0
        for doc_raw in raw.values():
            try:
                doc = orjson.loads(doc_raw)
                fresh = now - float(doc.get("updated_at", 0)) <= self.g.worker_stale_s
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
                continue
            if fresh:
                n_live += 1
                for m in doc.get("models") or {}:
                    live[m] = live.get(m, 0) + 1
        return _json({"status": "ok", "redis": "ok", "live_workers": n_live,
                      "models": {m: {"live_workers": n} for m, n in sorted(live.items())}})

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _room_left(e: ApiError) -> int | None:
    """The context left beside the prompt of a `context_length_exceeded` refusal, if any."""
    prompt, limit = e.details.get("prompt_tokens"), e.details.get("limit_tokens")
    if e.code != "context_length_exceeded" or not isinstance(prompt, int) or not isinstance(limit, int):
        return None
    return limit - prompt if limit - prompt >= 1 else None


async def _true_after(aw: Awaitable[None]) -> bool:
    await aw
    return True


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client closed the connection (the body was already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(receive: Receive, work: Awaitable[_T], job: Job, m: GatewayMetrics) -> _T | None:
    """`work`'s result; None if the client went away first, after cancelling the job's requests.

    When the gateway itself stops (this task is cancelled), the requests are left running: the
    queue finishes them, and a client that re-sends its `request_id` to another gateway gets them.
    """
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((work_task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping
        work_task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if work_task.done():
        return work_task.result()
    m.disconnects.labels(job.spec.model).inc()
    await job.cancel_unfinished()  # first: the work may take a while to notice its own cancellation
    await _cancel_and_wait(work_task)
    return None


async def _cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait for it, cancelling again while it resists: Python 3.11's asyncio.timeout()
    (entered by redis-py on every read) can swallow a cancel that lands as its own deadline fires."""
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=CANCEL_RETRY_S)
    if not task.cancelled():
        task.exception()  # retrieved: the client is gone, whatever it was


class _SSEResponse(Response):
    """text/event-stream of a Job's chunks; a client that goes away cancels the job's requests."""

    def __init__(self, job: Job, metrics: GatewayMetrics, arrived: float, headers: dict[str, str]) -> None:
        super().__init__(status_code=200)
        self.job, self.m, self.arrived = job, metrics, arrived
        self.raw_headers = SSE_HEADERS + [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        m, model = self.m, self.job.spec.model
        m.in_progress.inc()
        try:
            completed = await _unless_disconnected(receive, self._pump(send), self.job, m)
        finally:
            m.in_progress.dec()
            m.tokens.labels(model).inc(self.job.n_completion_tokens)
        if completed:
            m.e2e.labels(model).observe(time.perf_counter() - self.arrived)

    async def _pump(self, send: Send) -> bool:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            try:
                async with contextlib.aclosing(self.job.chunks()) as chunks:
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (redis.RedisError, ProtocolError, ValueError) as e:
                # Headers are out: the failure travels as an error chunk, then the stream ends cleanly.
                log.warning("stream %s: relay failed: %r", self.job.id, e)
                what = "the queue (Redis) is unavailable" if isinstance(e, redis.RedisError) else "bad reply event"
                error = ApiError(503 if isinstance(e, redis.RedisError) else 500, f"{what}: {type(e).__name__}",
                                 "server_error", "queue_unavailable" if isinstance(e, redis.RedisError)
                                 else "internal_error")
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + orjson.dumps(error_body(error)) + b"\n\n" + SSE_DONE})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4: send() to a closed connection
            await self.job.cancel_unfinished()
            self.m.disconnects.labels(self.job.spec.model).inc()
            return False
        return True


def create_app(settings: Settings, api_keys: frozenset[str] | None = None) -> Starlette:
    """The gateway app for `settings` (redis_url must be set). `api_keys` default: load_api_keys()."""
    gw = _Gateway(settings, load_api_keys(settings.gateway) if api_keys is None else api_keys)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        what = "no such route" if status == 404 else "method not allowed" if status == 405 else "HTTP error"
        return _error(ApiError(status, f"{what}: {request.method} {request.url.path}", code="unknown_url"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await gw.aclose()

    routes = [
        Route("/v1/chat/completions", gw.route("chat_completions", gw.chat_completions), methods=["POST"]),
        Route("/v1/completions", gw.route("completions", gw.completions), methods=["POST"]),
        Route("/v1/models", gw.route("models", gw.list_models), methods=["GET"]),
        Route("/v1/models/{model}", gw.route("model", gw.get_model), methods=["GET"]),
        Route("/health", gw.route("health", gw.health, auth=False), methods=["GET"]),
        Route("/metrics", gw.route("metrics", gw.metrics_route), methods=["GET"]),
    ]
    middleware = []
    if settings.gateway.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.gateway.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["authorization", "content-type"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    app.state.gateway = gw
    return app
