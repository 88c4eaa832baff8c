"""Owns: the gateway's error responses — OpenAI's error shape and the table from layermux errors to HTTP.
Changed by: whoever adds a wire error code (producer_sdk/errors.py) or a gateway refusal; keep the table
in README.md ("OpenAI-compatible gateway") in step.
Thread-safety: pure functions and an immutable table.

Every error leaves the gateway as ``{"error": {"message", "type", "code", "param"}}`` with the
status below, never as a traceback. The table, by layermux code:

    queue_full              429 rate_limit_error        rate_limit_exceeded   + Retry-After
    unknown_model           404 invalid_request_error   model_not_found       param "model"
    prompt_too_long         400 invalid_request_error   context_length_exceeded  (the numbers in the message)
    kv_exceeds_budget       400 invalid_request_error   context_length_exceeded
    max_tokens_over_limit   400 invalid_request_error   max_tokens_over_limit param "max_tokens"
    invalid_request, unsupported_version
                            400 invalid_request_error   (the code)
    deadline_exceeded       504 timeout_error           deadline_exceeded
    cancelled               409 invalid_request_error   request_cancelled
    worker_failure, dead_letter, any newer code
                            500 server_error            (the code)

Errors that say retrying cannot help (404, 400, 409, 504) carry ``x-should-retry: false``, which
the official OpenAI clients honour instead of retrying 409s and 5xx on their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from producer_sdk.errors import LayermuxClientError, QueueFullError

__all__ = ["ApiError", "api_error_for", "error_body"]


@dataclass
class ApiError(Exception):
    """An HTTP error in OpenAI's shape; raise it anywhere in a route."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # the refusal's numbers; not sent as fields

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def error_body(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "code": e.code, "param": e.param}}


# layermux code -> (status, type, OpenAI code or None = the layermux code, param)
_TABLE: Final[Mapping[str, tuple[int, str, str | None, str | None]]] = {
    "unknown_model": (404, "invalid_request_error", "model_not_found", "model"),
    "prompt_too_long": (400, "invalid_request_error", "context_length_exceeded", "messages"),
    "kv_exceeds_budget": (400, "invalid_request_error", "context_length_exceeded", "messages"),
    "max_tokens_over_limit": (400, "invalid_request_error", None, "max_tokens"),
    "invalid_request": (400, "invalid_request_error", None, None),
    "unsupported_version": (400, "invalid_request_error", None, None),
    "deadline_exceeded": (504, "timeout_error", None, "deadline_ms"),
    "cancelled": (409, "invalid_request_error", "request_cancelled", None),
}
_NO_RETRY: Final = {"x-should-retry": "false"}


def api_error_for(e: LayermuxClientError, *, prompt_param: str = "messages", retry_after_s: int = 1) -> ApiError:
    """The HTTP error of a typed SDK error (submit refusal or an error/cancelled terminal event)."""
    if isinstance(e, QueueFullError):
        return ApiError(429, f"{e.message} (layermux queue_full)", "rate_limit_error", "rate_limit_exceeded",
                        headers={"Retry-After": str(retry_after_s)})
    status, kind, code, param = _TABLE.get(e.code, (500, "server_error", None, None))
    if param == "messages":
        param = prompt_param
    message = e.message
    numbers = {k: v for k, v in e.details.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if numbers and status != 500:
        message += " (" + ", ".join(f"{k}={v}" for k, v in numbers.items()) + ")"
    headers = dict(_NO_RETRY) if status in (400, 404, 409, 504) else {}
    return ApiError(status, message, kind, code or e.code, param, headers, dict(e.details))
