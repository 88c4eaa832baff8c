"""Owns: the worker's counters, gauges and latency histograms, exposed in Prometheus's text format
through prometheus-client, and the tiny HTTP server that serves them (asyncio.start_server).
Changed by: whoever adds a metric; names follow Prometheus conventions (units as suffixes), and
vLLM's where the meaning is the same (`vllm:time_to_first_token_seconds` ->
`layermux:time_to_first_token_seconds`), so dashboards built for vLLM need only the prefix changed.
Thread-safety: event-loop only; all mutation happens on the worker's loop.

The figures live in plain per-model objects (`ModelCounters`), which the stats hash and
`layermux status` also read; a prometheus-client collector turns them into metric families at
scrape time, and gauges that mirror other state (backlog, running, the ledger) are read then
through `Metrics.gauge_source`, so they are never stale. One registry per `Metrics`, never the
process-global one: tests run several runtimes in one process.

Latency histograms, per model, observed when a request finishes with `done` (refusals,
errors and cancellations would distort them; they have their own counters):

    layermux_queue_wait_seconds            submit -> start (kept for existing dashboards; observed at start)
    layermux:request_queue_time_seconds    the same figure under vLLM's name
    layermux:time_to_first_token_seconds   submit -> first token (queue wait + prefill)
    layermux:time_per_output_token_seconds decode time / (completion tokens - 1), the request's mean
    layermux:e2e_request_latency_seconds   submit -> terminal event
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Gauges", "Histo", "Metrics", "ModelCounters", "serve_metrics"]

log = logging.getLogger("layermux.worker.metrics")

# Queue-wait histogram buckets, seconds (submit -> start).
WAIT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Time to first token and end-to-end latency, seconds (vLLM's bounds, extended for long queues).
LATENCY_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
# Time per output token, seconds.
TPOT_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                         1.0, 2.5, 5.0)
# Recent queue waits kept per model for the p50/p99 written to the stats hash.
WAIT_SAMPLES: Final = 1024


@dataclass
class Histo:
    """Bucket counts (non-cumulative, the last one is +Inf) and the sum of one histogram."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum_s: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value_s: float) -> None:
        value_s = max(0.0, value_s)
        self.counts[bisect.bisect_left(self.bounds, value_s)] += 1
        self.sum_s += value_s
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, cumulative = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            cumulative += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cumulative)))
        return out


@dataclass
class ModelCounters:
    admitted: int = 0
    done: int = 0
    errors: int = 0
    cancelled: int = 0
    tokens_generated: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_codes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait: Histo = field(default_factory=lambda: Histo(WAIT_BUCKETS_S))
    ttft: Histo = field(default_factory=lambda: Histo(LATENCY_BUCKETS_S))
    tpot: Histo = field(default_factory=lambda: Histo(TPOT_BUCKETS_S))
    e2e: Histo = field(default_factory=lambda: Histo(LATENCY_BUCKETS_S))
    recent_waits_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))

    @property
    def wait_count(self) -> int:
        return self.wait.count

    def observe_wait(self, wait_s: float) -> None:
        self.wait.observe(wait_s)
        self.recent_waits_ms.append(max(0.0, wait_s) * 1000.0)

    def observe_done(self, usage: Mapping[str, float]) -> None:
        """Latencies of a request that finished with `done` (usage as in the done event, milliseconds)."""
        n = int(usage.get("completion_tokens", 0))
        if n >= 1:
            self.ttft.observe((usage.get("queue_ms", 0.0) + usage.get("prefill_ms", 0.0)) / 1000.0)
        if n >= 2:
            self.tpot.observe(usage.get("decode_ms", 0.0) / 1000.0 / (n - 1))
        self.e2e.observe(usage.get("total_ms", 0.0) / 1000.0)

    def wait_quantile_ms(self, q: float) -> float | None:
        """Nearest-rank quantile of the recent queue waits, or None before the first one."""
        if not self.recent_waits_ms:
            return None
        ordered = sorted(self.recent_waits_ms)
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


@dataclass
class Gauges:
    """Scrape-time values: per-model backlog and running, and the ledger dict."""

    backlog: Mapping[str, int]
    running: Mapping[str, int]
    ledger: Mapping[str, object]


_COUNTERS: Final[list[tuple[str, str, Callable[[ModelCounters], float]]]] = [
    ("layermux_admitted", "Requests started.", lambda c: c.admitted),
    ("layermux_done", "Requests finished with a done event.", lambda c: c.done),
    ("layermux_errors", "Requests finished with an error event (refusals included).", lambda c: c.errors),
    ("layermux_cancelled", "Requests finished with a cancelled event.", lambda c: c.cancelled),
    ("layermux_tokens_generated", "Completion tokens generated.", lambda c: c.tokens_generated),
]
_HISTOGRAMS: Final[list[tuple[str, str, Callable[[ModelCounters], Histo]]]] = [
    ("layermux_queue_wait_seconds", "Time from submit to start.", lambda c: c.wait),
    ("layermux:request_queue_time_seconds", "Time from submit to start (vLLM's name).", lambda c: c.wait),
    ("layermux:time_to_first_token_seconds", "Time from submit to the first token, requests done.",
     lambda c: c.ttft),
    ("layermux:time_per_output_token_seconds", "Mean time per output token after the first, requests done.",
     lambda c: c.tpot),
    ("layermux:e2e_request_latency_seconds", "Time from submit to the done event.", lambda c: c.e2e),
]


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m, w = self._m, self._m.worker_id
        gauges = m.gauge_source() if m.gauge_source is not None else None
        if gauges is not None:
            backlog = GaugeMetricFamily("layermux_backlog", "Entries in the model's request streams (queued or "
                                        "running).", labels=["worker", "model"])
            running = GaugeMetricFamily("layermux_running", "Requests of the model running in this worker's "
                                        "engine.", labels=["worker", "model"])
            for name in m.models:
                backlog.add_metric([w, name], gauges.backlog.get(name, 0))
                running.add_metric([w, name], gauges.running.get(name, 0))
            yield backlog
            yield running
        for metric_name, help_text, get in _COUNTERS:
            family = CounterMetricFamily(metric_name, help_text, labels=["worker", "model"])
            for name, c in m.models.items():
                family.add_metric([w, name], get(c))
            yield family
        refused = CounterMetricFamily("layermux_refused", "Requests denied at admission, by error code.",
                                      labels=["worker", "model", "code"])
        for name, c in m.models.items():
            for code, n in sorted(c.refused.items()):
                refused.add_metric([w, name, code], n)
        yield refused
        for metric_name, help_text, get_h in _HISTOGRAMS:
            hist = HistogramMetricFamily(metric_name, help_text, labels=["worker", "model"])
            for name, c in m.models.items():
                h = get_h(c)
                hist.add_metric([w, name], h.buckets(), h.sum_s)
            yield hist
        if gauges is not None:
            yield from _ledger_families(w, gauges.ledger)


def _ledger_families(w: str, ledger: Mapping[str, object]) -> Iterator[Metric]:
    total = GaugeMetricFamily("layermux_ledger_bytes", "Device ledger figures (budget, cap, used, headroom).",
                              labels=["worker", "kind"])
    for key in ("budget_bytes", "cap_bytes", "used_bytes", "headroom_bytes"):
        value = ledger.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            total.add_metric([w, key.removesuffix("_bytes")], value)
    yield total
    per_model = GaugeMetricFamily("layermux_model_ledger_bytes", "Device bytes booked per model and kind.",
                                  labels=["worker", "model", "kind"])
    booked = ledger.get("models")
    if isinstance(booked, Mapping):
        for name, figures in booked.items():
            if isinstance(figures, Mapping):
                for key, value in figures.items():
                    if isinstance(value, int | float) and not isinstance(value, bool) and str(key).endswith("_bytes"):
                        per_model.add_metric([w, str(name), str(key).removesuffix("_bytes")], value)
    yield per_model


class Metrics:
    def __init__(self, models: Iterable[str], worker_id: str) -> None:
        self.worker_id = worker_id
        self.models: dict[str, ModelCounters] = {m: ModelCounters() for m in models}
        self.gauge_source: Callable[[], Gauges] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def __getitem__(self, model: str) -> ModelCounters:
        return self.models[model]

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4), by prometheus-client."""
        return generate_latest(self.registry).decode()


# -- HTTP ------------------------------------------------------------------------------------------

_MAX_REQUEST_BYTES: Final = 8192
_READ_TIMEOUT_S: Final = 5.0


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Serve GET /metrics (and /) on host:port. port 0 picks a free port (see server.sockets)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"method not allowed\n", "text/plain"
            elif path.split("?", 1)[0] in ("/metrics", "/"):
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                body = metrics.render().encode()
            else:
                status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away or sent garbage; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_BYTES)
