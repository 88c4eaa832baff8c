"""Owns: the exception tree raised by the producer SDK (and reused by the worker for protocol errors).
Changed by: whoever adds a wire error code; keep the tree below and `protocol.ErrorCode` in step.
Thread-safety: plain immutable-after-construction exception objects.

The tree::

    LayermuxClientError                  base; every instance has .code, .message, .details
    ├── QueueFullError(depth, limit)     submit: the model's backlog is at its limit (code
    │                                    "queue_full"). Backpressure: retry later; nothing was queued.
    ├── UnknownModelError                submit, or an error event "unknown_model": no worker
    │                                    serves the model (its limits hash is absent)
    ├── RejectedError(code, message, details)
    │                                    error event with any other code (prompt_too_long,
    │                                    kv_exceeds_budget, max_tokens_over_limit, invalid_request,
    │                                    unsupported_version, or a code newer than this SDK);
    │                                    details holds the numbers (needed, available, limit, ...)
    ├── DeadlineExceededError            error event "deadline_exceeded"
    ├── WorkerFailureError               error event "worker_failure" or "dead_letter"
    ├── RequestTimeoutError              result(timeout=...) elapsed first; the request itself
    │                                    keeps running (cancel it if it is no longer wanted)
    ├── RequestCancelledError            the request ended with a "cancelled" event
    └── ProtocolError(code, message)     bytes that are not a valid v1 message or event, or
                                         submit() arguments outside the protocol's ranges.
                                         Also a ValueError. Codes: "unsupported_version",
                                         "invalid_request", "invalid_event", and
                                         "invalid_reply" (the enqueue script answered
                                         something unexpected).

Errors raised by redis-py itself (``redis.exceptions.ConnectionError`` once the reconnect
budget is spent, ``AuthenticationError``, ...) are not wrapped: they mean the transport,
not the request, failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "DeadlineExceededError",
    "LayermuxClientError",
    "ProtocolError",
    "QueueFullError",
    "RejectedError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "UnknownModelError",
    "WorkerFailureError",
]


class LayermuxClientError(Exception):
    """Base of every error the SDK raises about a request (see the module docstring)."""

    code: str
    message: str
    details: dict[str, Any]
    request_id: str | None

    def __init__(
        self,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.request_id = request_id


class QueueFullError(LayermuxClientError):
    """The model's backlog (`depth` entries) reached its `limit`; nothing was enqueued."""

    def __init__(self, model: str, depth: int, limit: int, *, request_id: str | None = None) -> None:
        super().__init__(
            "queue_full",
            f"model {model!r} has {depth} queued requests, limit {limit}; retry later",
            {"model": model, "depth": depth, "limit": limit},
            request_id=request_id,
        )
        self.model = model
        self.depth = depth
        self.limit = limit


class UnknownModelError(LayermuxClientError):
    """No worker serves the model."""


class RejectedError(LayermuxClientError):
    """A worker refused the request; `code` says why and `details` carries the numbers."""


class DeadlineExceededError(LayermuxClientError):
    """The request's deadline passed before it finished."""


class WorkerFailureError(LayermuxClientError):
    """The worker failed the request (crash loop, engine error, or dead-lettered)."""


class RequestTimeoutError(LayermuxClientError):
    """The caller's wait timed out; the request was not cancelled by this."""


class RequestCancelledError(LayermuxClientError):
    """The request was cancelled; `details["completion_tokens"]` says how far it got."""


class ProtocolError(LayermuxClientError, ValueError):
    """A message or event that is not valid protocol v1 (or submit() arguments that are not)."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None) -> None:
        super().__init__(code, message, request_id=request_id)
