"""Owns: the gateway's Prometheus metrics (prometheus-client, one registry per app, served on GET /metrics).
Changed by: whoever adds a gateway metric; names follow Prometheus conventions and, where the
meaning is the same, vLLM's (`vllm:time_to_first_token_seconds` -> `layermux_gateway_...`).
Thread-safety: prometheus-client metrics are thread-safe; the gateway uses them from its event loop.

What a gateway measures is what its clients see: time to first token from the moment the HTTP
request arrived (queue wait and the Redis round trips included), end-to-end latency, tokens
relayed, requests by route and status, and clients that went away mid-request.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["LATENCY_BUCKETS_S", "GatewayMetrics"]

# Seconds; the same bounds as the worker's latency histograms (worker/metrics.py).
LATENCY_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                            7.5, 10.0, 20.0, 40.0, 80.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("layermux_gateway_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.in_progress = Gauge("layermux_gateway_requests_in_progress",
                                 "Completion requests being answered (streaming or not).", registry=r)
        self.ttft = Histogram("layermux_gateway_time_to_first_token_seconds",
                              "Time from the HTTP request's arrival to its first token relayed (streaming).",
                              ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("layermux_gateway_e2e_request_latency_seconds",
                             "Time from the HTTP request's arrival to its last byte, completed requests.",
                             ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.tokens = Counter("layermux_gateway_completion_tokens", "Completion tokens relayed to clients.",
                              ["model"], registry=r)
        self.disconnects = Counter("layermux_gateway_client_disconnects",
                                   "Requests cancelled because their client went away.", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
