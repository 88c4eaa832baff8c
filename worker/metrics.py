"""Owns: the worker's counters, gauges and queue-wait histogram, their Prometheus text
exposition, and the tiny HTTP server that serves it (asyncio.start_server, no dependency).
Changed by: whoever adds a metric; names follow Prometheus conventions (units as suffixes).
Thread-safety: event-loop only; all mutation happens on the worker's loop.

Counters and the histogram live here; gauges that mirror other state (backlog, running, the
ledger) are read at scrape time through `Metrics.gauge_source`, so they are never stale.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["Gauges", "Metrics", "ModelCounters", "serve_metrics"]

log = logging.getLogger("layermux.worker.metrics")

# Queue-wait histogram buckets, seconds (submit -> start).
WAIT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Recent queue waits kept per model for the p50/p99 written to the stats hash.
WAIT_SAMPLES: Final = 1024


@dataclass
class ModelCounters:
    admitted: int = 0
    done: int = 0
    errors: int = 0
    cancelled: int = 0
    tokens_generated: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_codes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS_S) + 1))
    wait_sum_s: float = 0.0
    wait_count: int = 0
    recent_waits_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))

    def observe_wait(self, wait_s: float) -> None:
        wait_s = max(0.0, wait_s)
        self.wait_bucket_counts[bisect.bisect_left(WAIT_BUCKETS_S, wait_s)] += 1
        self.wait_sum_s += wait_s
        self.wait_count += 1
        self.recent_waits_ms.append(wait_s * 1000.0)

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


class Metrics:
    def __init__(self, models: Iterable[str], worker_id: str) -> None:
        self.worker_id = worker_id
        self.models: dict[str, ModelCounters] = {m: ModelCounters() for m in models}
        self.gauge_source: Callable[[], Gauges] | None = None

    def __getitem__(self, model: str) -> ModelCounters:
        return self.models[model]

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        w = _escape(self.worker_id)

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, value: float, **labels: str) -> None:
            lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in {"worker": w, **labels}.items())
            out.append(f"{name}{{{lbl}}} {_num(value)}")

        gauges = self.gauge_source() if self.gauge_source is not None else None
        if gauges is not None:
            family("layermux_backlog", "gauge", "Entries in the model's request stream (queued or running).")
            for m in self.models:
                sample("layermux_backlog", gauges.backlog.get(m, 0), model=m)
            family("layermux_running", "gauge", "Requests of the model running in this worker's engine.")
            for m in self.models:
                sample("layermux_running", gauges.running.get(m, 0), model=m)
        per_model: list[tuple[str, str, str, Callable[[ModelCounters], float]]] = [
            ("layermux_admitted_total", "counter", "Requests started.", lambda c: c.admitted),
            ("layermux_done_total", "counter", "Requests finished with a done event.", lambda c: c.done),
            ("layermux_errors_total", "counter", "Requests finished with an error event (refusals included).",
             lambda c: c.errors),
            ("layermux_cancelled_total", "counter", "Requests finished with a cancelled event.", lambda c: c.cancelled),
            ("layermux_tokens_generated_total", "counter", "Completion tokens generated.",
             lambda c: c.tokens_generated),
        ]
        for name, kind, help_text, get in per_model:
            family(name, kind, help_text)
            for m, c in self.models.items():
                sample(name, get(c), model=m)
        family("layermux_refused_total", "counter", "Requests denied at admission, by error code.")
        for m, c in self.models.items():
            for code, n in sorted(c.refused.items()):
                sample("layermux_refused_total", n, model=m, code=code)
        family("layermux_queue_wait_seconds", "histogram", "Time from submit to start.")
        for m, c in self.models.items():
            cumulative = 0
            for bound, n in zip((*WAIT_BUCKETS_S, float("inf")), c.wait_bucket_counts):
                cumulative += n
                sample("layermux_queue_wait_seconds_bucket", cumulative, model=m,
                       le="+Inf" if bound == float("inf") else _num(bound))
            sample("layermux_queue_wait_seconds_sum", c.wait_sum_s, model=m)
            sample("layermux_queue_wait_seconds_count", c.wait_count, model=m)
        if gauges is not None:
            family("layermux_ledger_bytes", "gauge", "Device ledger figures (budget, cap, used, headroom).")
            for key in ("budget_bytes", "cap_bytes", "used_bytes", "headroom_bytes"):
                value = gauges.ledger.get(key)
                if isinstance(value, (int, float)):
                    sample("layermux_ledger_bytes", value, kind=key.removesuffix("_bytes"))
            family("layermux_model_ledger_bytes", "gauge", "Device bytes booked per model and kind.")
            booked = gauges.ledger.get("models")
            if isinstance(booked, Mapping):
                for m, figures in booked.items():
                    if isinstance(figures, Mapping):
                        for key, value in figures.items():
                            if isinstance(value, (int, float)) and str(key).endswith("_bytes"):
                                sample("layermux_model_ledger_bytes", value, model=str(m),
                                       kind=str(key).removesuffix("_bytes"))
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


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
