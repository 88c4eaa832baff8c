"""Owns: the worker's supervisor — builds the engine driver, publisher and one consumer per model,
runs them as supervised tasks (plus lease renewal, cancel watching, the stats reporter and the
metrics server), registers the models in Redis, and drains on shutdown. arq's generate jobs
(arq_app.py) run on its driver through request_path.py, as the consumers' requests do.
Changed by: the worker; arq_app.py is its only caller besides tests.
Thread-safety: event-loop only; one Runtime per process (it owns the device).

Shutdown (`drain`): consumers stop reading; running requests get drain_timeout_s to finish;
whatever still runs then is abandoned without a terminal event and its entry stays pending
(not acked), so another worker claims it after lease_idle_ms and resumes from the reply
stream. The publisher gets a last chance to write what is queued; then every task is cancelled,
the engine closed and this worker's P:workers entry removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer_sdk.connection import make_async_client
from producer_sdk.keys import CONSUMER_GROUP, PRIORITY_BANDS, Keys
from producer_sdk.protocol import PROTOCOL_VERSION

from .consumer import ModelConsumer
from .engine_driver import EngineDriver, EngineFactory, Outcome, _default_engine_factory, footprint_json
from .metrics import Gauges, Metrics, serve_metrics
from .publisher import AckEntry, Publisher, backoff_s
from .settings import ConfigError, Settings

__all__ = ["Runtime", "serve_until_signal"]

log = logging.getLogger("layermux.worker")

# A supervised task that ran this long before crashing restarts with its backoff reset.
SUPERVISOR_RESET_AFTER_S: Final = 60.0
# Time the publisher gets after the drain window to write what is still queued.
FINAL_FLUSH_S: Final = 5.0
# cancel_and_wait: cancel again this often while a task has not finished; warn after so many rounds.
CANCEL_RETRY_S: Final = 0.1
CANCEL_WARN_ROUNDS: Final = 50


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they are done, cancelling again while they resist.

    Python 3.11's asyncio.timeout() can swallow an outside cancel that lands while its own
    deadline fires (CPython gh-102780, fixed in 3.12); redis-py enters timeout(0) on every command
    (hiredis can_read_destructive), so a single cancel() occasionally gets lost.
    """
    pending = {t for t in tasks if not t.done()}
    rounds = 0
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
        rounds += 1
        if rounds == CANCEL_WARN_ROUNDS:
            log.warning("tasks still running after %d cancels: %s", rounds, sorted(t.get_name() for t in pending))
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("task %s ended with %r", t.get_name(), t.exception())


class Runtime:
    """One worker: `await start()`, serve, `await drain()`. See the module docstring."""

    def __init__(self, settings: Settings, *, engine_factory: EngineFactory = _default_engine_factory) -> None:
        if not settings.models:
            raise ConfigError("models: no model configured; add at least one [[models]] table (name, path)")
        if settings.redis_url is None:
            raise ConfigError("redis_url: not set (worker.arq_app.run starts an embedded server when it is unset)")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.metrics = Metrics([m.name for m in settings.models], settings.worker_id)
        self.driver = EngineDriver(settings, engine_factory=engine_factory,
                                   on_tokens_generated=self._count_tokens, on_finished=self._observe_finished)
        self.redis: aioredis.Redis | None = None
        self.publisher: Publisher | None = None
        self.consumers: dict[str, ModelConsumer] = {}
        self.waiting: dict[str, int] = {m.name: 0 for m in settings.models}
        self.backlog: dict[str, int] = {m.name: 0 for m in settings.models}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._metrics_server: asyncio.Server | None = None
        self._draining = False
        self._drained = asyncio.Event()
        self.started_at = time.time()
        self._heartbeat_loops: int | None = None  # the engine's n_loops at the last heartbeat check
        self._device_fault_said = False  # the device-fault line is logged once

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        assert s.redis_url is not None
        self.redis = make_async_client(s.redis_url, mode=s.redis_mode, urls=s.redis_urls,
                                       sentinel_master=s.sentinel_master)
        try:
            await self.redis.ping()
            await self.driver.start()
            self.publisher = Publisher(self.redis, self.keys, s.reply_ttl_s)
            self.publisher.on_acked = self._on_acked
            self.publisher.on_fenced = self.driver.abandon
            for m in s.models:
                self.consumers[m.name] = ModelConsumer(
                    model=m, settings=s, client=self.redis, keys=self.keys, driver=self.driver,
                    publisher=self.publisher, metrics=self.metrics, waiting=self.waiting)
            for c in self.consumers.values():
                await c.ensure_group()
            await self._register_models()
            self.metrics.gauge_source = self._gauges
            self._supervise("publisher", self.publisher.run)
            for name, c in self.consumers.items():
                self._supervise(f"consumer:{name}", c.run)
                self._supervise(f"leases:{name}", c.renew_leases)
                self._supervise(f"cancels:{name}", c.watch_cancels)
            self._supervise("stats", self._report_stats)
            self._supervise("heartbeat", self._heartbeat)
            if s.metrics_port is not None:
                self._metrics_server = await serve_metrics(self.metrics, s.metrics_host, s.metrics_port)
                log.info("metrics on http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        except BaseException:
            await self._close()
            raise
        log.info("worker %s serving %s (key prefix %r)", s.worker_id, ", ".join(self.consumers), s.key_prefix)

    @property
    def draining(self) -> bool:
        """drain() was called: no new work starts here."""
        return self._draining

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None or not self._metrics_server.sockets:
            return None
        return int(self._metrics_server.sockets[0].getsockname()[1])

    async def drain(self, timeout_s: float | None = None) -> None:
        """Graceful shutdown (idempotent; a second caller waits for the first)."""
        if self._draining:
            await self._drained.wait()
            return
        self._draining = True
        try:
            await self._drain(self.settings.drain_timeout_s if timeout_s is None else timeout_s)
            await self._flush_after_drain()
        finally:
            await self._close()
            self._drained.set()

    async def _drain(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        log.info("draining: reading stopped; %d requests running get up to %.1f s to finish",
                 self.driver.running_count(), timeout_s)
        deadline = loop.time() + timeout_s
        for c in self.consumers.values():
            c.stop()
        self.driver.capacity.notify()
        # A consumer leaves its loop after its current BLOCK read at the latest; meanwhile the
        # running requests have the drain window (an entry read in that last BLOCK still starts,
        # and is abandoned like the others if the window closes first).
        readers = [t for n, t in self._tasks.items() if n.startswith("consumer:")]
        readers_done = asyncio.ensure_future(
            asyncio.wait(readers, timeout=self.settings.read_block_ms / 1000.0 + 1.0)) if readers else None
        try:
            await self._wait_running(deadline)
            if readers_done is not None:
                _, slow = await readers_done
                await cancel_and_wait(slow)
                await self._wait_running(deadline)
        finally:
            if readers_done is not None and not readers_done.done():
                readers_done.cancel()

    async def _wait_running(self, deadline: float) -> None:
        """Until no request runs, or `deadline` (loop time): then abandon what still runs."""
        loop = asyncio.get_running_loop()
        while self.driver.running_count() > 0:
            waiter = self.driver.capacity.waiter()
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), left)
        if self.driver.running_count() > 0:
            log.warning("drain: %d requests still running at the end of the drain window; "
                        "leaving them pending for another worker", self.driver.running_count())
            self.driver.abandon_all()

    async def _flush_after_drain(self) -> None:
        if self.publisher is not None and not await self.publisher.flush(FINAL_FLUSH_S):
            log.warning("drain: could not write every reply event within %.1f s; their entries stay pending",
                        FINAL_FLUSH_S)
        log.info("drained")

    async def _close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.hdel(self.keys.workers(), self.settings.worker_id)  # type: ignore[misc]
                await self.redis.delete(self.keys.heartbeat(self.settings.worker_id))
        await self.driver.close()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    # -- supervision ------------------------------------------------------------------------------------

    def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run fn() as a task; restart it with jittered backoff when it raises. Returning ends it."""

        async def supervised() -> None:
            failures = 0
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                try:
                    await fn()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if loop.time() - started > SUPERVISOR_RESET_AFTER_S:
                        failures = 0
                    delay = max(0.05, backoff_s(failures))
                    failures += 1
                    log.exception("task %s crashed (failure %d); restarting in %.2f s", name, failures, delay)
                    await asyncio.sleep(delay)

        self._tasks[name] = asyncio.create_task(supervised(), name=f"layermux:{name}")

    def task_names(self) -> list[str]:
        return [n for n, t in self._tasks.items() if not t.done()]

    # -- Redis registration and stats -------------------------------------------------------------------

    async def _register_models(self) -> None:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in self.settings.models:
                n_ctx = self.driver.info[m.name].n_ctx
                pipe.hset(self.keys.limits(m.name), mapping={
                    "max_backlog": m.max_backlog, "max_tokens": m.max_tokens_limit,
                    "max_prompt_tokens": max(1, n_ctx - 1), "n_ctx": n_ctx, "schema_version": PROTOCOL_VERSION})
                pipe.sadd(self.keys.models(), m.name)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        while True:
            await self.heartbeat_once()
            await asyncio.sleep(self.settings.heartbeat_ttl_s / 4)

    async def heartbeat_once(self) -> bool:
        """Refresh the heartbeat key if the engine thread went round its loop since the last call, or
        has nothing to do. A busy engine that stands still (or an event loop that stops calling
        this) lets the key expire after heartbeat_ttl_s: that is what the liveness probe sees."""
        assert self.redis is not None
        eng = self.driver.eng
        if eng is None:
            return False
        health = eng.health()
        if health.device_fault:
            # A lost GPU never computes again in this process (docs/vulkan.md): stop the heartbeat at
            # once so the liveness probe fails and the orchestrator restarts the worker; the requests
            # it holds are reclaimed from Redis as for any dead worker.
            if not self._device_fault_said:
                self._device_fault_said = True
                log.error("engine device fault: %s; heartbeat stopped so the liveness probe restarts this "
                          "worker (layermux status --alive %s now exits 1)", health.device_fault,
                          self.settings.worker_id)
            await self.redis.delete(self.keys.heartbeat(self.settings.worker_id))
            return False
        alive = not health.busy or health.n_loops != self._heartbeat_loops
        self._heartbeat_loops = health.n_loops
        if alive:
            doc = {"n_loops": health.n_loops, "busy": health.busy, "at": time.time()}
            await self.redis.set(self.keys.heartbeat(self.settings.worker_id), orjson.dumps(doc),
                                 px=max(1, int(self.settings.heartbeat_ttl_s * 1000)))
        return alive

    async def _report_stats(self) -> None:
        loop = asyncio.get_running_loop()
        prune_due = loop.time()
        while True:
            await self.report_stats_once()
            if loop.time() >= prune_due:
                for consumer in self.consumers.values():
                    await consumer.prune_consumers()
                prune_due = loop.time() + min(60.0, self.settings.consumer_expiry_s / 2)
            await asyncio.sleep(self.settings.stats_interval_s)

    async def report_stats_once(self) -> None:
        assert self.redis is not None
        s = self.settings
        names = list(self.consumers)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                for stream in self.keys.req_streams(name):
                    pipe.xlen(stream)
                    pipe.xpending(stream, CONSUMER_GROUP)
            replies = await pipe.execute(raise_on_error=False)
        n_bands = len(PRIORITY_BANDS)
        for i, name in enumerate(names):
            backlog = waiting = 0
            ok = True
            for b in range(n_bands):
                xlen, pending = replies[2 * (i * n_bands + b)], replies[2 * (i * n_bands + b) + 1]
                if isinstance(xlen, int):
                    n_pending = int(pending["pending"]) if isinstance(pending, dict) else 0
                    backlog += xlen
                    waiting += max(0, xlen - n_pending)
                elif isinstance(xlen, Exception) and not isinstance(xlen, ResponseError):
                    raise xlen
                else:
                    ok = False
            if ok:
                self.backlog[name] = backlog
                self.waiting[name] = waiting
        self.driver.capacity.notify()  # demand changed: the fair-share gate may open
        now = time.time()
        ledger = self.driver.ledger()
        info = self.driver.eng.models() if self.driver.eng is not None else {}
        models_doc: dict[str, Any] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                c = self.metrics[name]
                m = s.model(name)
                fields: dict[str, Any] = {
                    "backlog": self.backlog[name], "running": self.driver.running_count(name),
                    "admitted": c.admitted, "done": c.done, "errors": c.errors, "cancelled": c.cancelled,
                    "tokens_generated": c.tokens_generated, "updated_at": now, "worker": s.worker_id,
                }
                for code, n in c.refused.items():
                    fields[f"refused_{code}"] = n
                for key, q in (("queue_wait_p50_ms", 0.5), ("queue_wait_p99_ms", 0.99)):
                    v = c.wait_quantile_ms(q)
                    if v is not None:
                        fields[key] = round(v, 3)
                pipe.hset(self.keys.stats(name), mapping=fields)
                mi = info.get(name)
                models_doc[name] = {
                    "running": self.driver.running_count(name), "n_running": self.driver.running_count(name),
                    "n_requests": mi.n_requests if mi else None, "waiting": self.waiting[name],
                    "backlog": self.backlog[name], "sched_weight": m.sched_weight, "max_running": m.max_running,
                    "resident": mi.resident if mi else None, "weights": mi.weights if mi else None,
                    "matrix_format": mi.matrix_format if mi else None, "n_ctx": mi.n_ctx if mi else None,
                    "n_slots": mi.n_slots if mi else None,
                    "footprint": footprint_json(mi.footprint) if mi else None,
                    "gate": self.consumers[name].gate_verdict.value,
                }
            doc = {
                "worker_id": s.worker_id, "models": models_doc, "ledger": ledger,
                "queues": {n: {"backlog": self.backlog[n], "waiting": self.waiting[n]} for n in names},
                "eviction": s.device.eviction, "prefetch_depth": s.device.prefetch_depth,
                "n_threads": s.device.n_threads, "matmul_precision": s.device.matmul_precision,
                "link_gbps": s.device.link_gbps,
                "priority_aging_s": s.priority_aging_s, "started_at": self.started_at, "updated_at": now,
                "engine": self._engine_doc(),
            }
            pipe.hset(self.keys.workers(), s.worker_id, orjson.dumps(doc).decode())
            await pipe.execute()

    def _engine_doc(self) -> dict[str, Any] | None:
        """The engine's running totals since it started: steps, tokens, turns, and what streaming cost
        (bytes copied, time compute waited for copies; on a GPU the device's own measure)."""
        if self.driver.eng is None:
            return None
        st = self.driver.eng.stats()
        r = st.residency
        return {"n_steps": st.n_steps, "n_tokens_computed": st.n_tokens_computed,
                "n_tokens_generated": st.n_tokens_generated, "n_preemptions": st.n_preemptions,
                "n_turns": st.n_turns, "n_borrow_turns": st.n_borrow_turns, "step_ms_total": st.step_ms_total,
                "bytes_copied": r.bytes_copied, "copy_ms": r.copy_ms, "copy_wait_ms": r.copy_wait_ms,
                "n_loads": r.n_loads}

    def _gauges(self) -> Gauges:
        return Gauges(backlog=dict(self.backlog),
                      running={n: self.driver.running_count(n) for n in self.consumers},
                      ledger=self.driver.ledger() if self.driver.eng is not None else {})

    def _count_tokens(self, model: str, n: int) -> None:
        self.metrics[model].tokens_generated += n

    def _observe_finished(self, model: str, outcome: Outcome) -> None:
        if outcome.kind == "done":
            self.metrics[model].observe_done(outcome.usage)

    def _on_acked(self, entry: AckEntry) -> None:
        c = self.consumers.get(entry.model)
        if c is not None:
            c.lease_released(entry)


async def serve_until_signal(settings: Settings) -> int | None:
    """The stream path alone, without arq's job queue (which needs one standalone server): the worker of
    redis_mode cluster and sentinel. Serves until SIGTERM/SIGINT, then drains; a second signal stops at
    once (running requests stay pending for another worker). Returns the signal number that stopped it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if got:
            sys.stderr.write(f"layermux worker: {name} again: stopping now without draining\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        got.append(signum)
        sys.stderr.write(f"layermux worker: {name}: draining (running requests get up to drain_timeout_s)\n")
        sys.stderr.flush()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, int(sig))
    runtime = Runtime(settings)
    try:
        await runtime.start()
        await stop.wait()
    finally:
        await runtime.drain()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return got[0] if got else None
