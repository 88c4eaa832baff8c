"""Owns: every Redis key name of protocol v1, and the syntax of model names and request ids.
Changed by: protocol changes only (docs/protocol.md lists the same keys); never build keys elsewhere.
Thread-safety: `Keys` is immutable; share it freely.

Hash tags make the names Redis-Cluster-safe: all keys of a model share the slot of
``{m:<model>}`` (so the enqueue script may touch them together), all keys of a request share
``{r:<request_id>}``. The prefix must therefore contain no braces.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "CONSUMER_GROUP",
    "MODEL_NAME_PATTERN",
    "PREFIX_PATTERN",
    "PRIORITY_BANDS",
    "REQUEST_ID_PATTERN",
    "Keys",
    "check_model_name",
    "check_request_id",
    "priority_band",
]

MODEL_NAME_PATTERN: Final = r"[A-Za-z0-9._-]{1,64}"
REQUEST_ID_PATTERN: Final = r"[A-Za-z0-9._:-]{1,128}"
PREFIX_PATTERN: Final = r"[A-Za-z0-9._:-]{1,64}"

# The consumer group every worker joins on each of a model's request streams.
CONSUMER_GROUP: Final = "workers"

# A model's requests wait in one stream per priority band (Redis streams are FIFO and a
# consumer group delivers in order, so priority needs separate streams, as Celery's Redis
# transport does with its priority steps). Listed highest first; "normal" is priority 0.
PRIORITY_BANDS: Final = ("high", "normal", "low")


def priority_band(priority: int) -> str:
    """The band of a request priority: > 0 high, 0 normal, < 0 low."""
    return "high" if priority > 0 else "low" if priority < 0 else "normal"

_MODEL_RE: Final = re.compile(MODEL_NAME_PATTERN)
_REQUEST_ID_RE: Final = re.compile(REQUEST_ID_PATTERN)
_PREFIX_RE: Final = re.compile(PREFIX_PATTERN)


def check_model_name(model: str) -> str:
    """Return `model` if it matches MODEL_NAME_PATTERN, else raise ValueError saying so."""
    if not isinstance(model, str) or _MODEL_RE.fullmatch(model) is None:
        raise ValueError(f"model name: expected {MODEL_NAME_PATTERN}, found {model!r}")
    return model


def check_request_id(request_id: str) -> str:
    """Return `request_id` if it matches REQUEST_ID_PATTERN, else raise ValueError saying so."""
    if not isinstance(request_id, str) or _REQUEST_ID_RE.fullmatch(request_id) is None:
        raise ValueError(f"request id: expected {REQUEST_ID_PATTERN}, found {request_id!r}")
    return request_id


class Keys:
    """Key names under one prefix. Methods validate their argument and raise ValueError."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "lmx") -> None:
        if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
            raise ValueError(f"key prefix: expected {PREFIX_PATTERN} (no braces), found {prefix!r}")
        self.prefix: Final = prefix

    def __repr__(self) -> str:
        return f"Keys(prefix={self.prefix!r})"

    def _model_key(self, model: str, suffix: str) -> str:
        return f"{self.prefix}:{{m:{check_model_name(model)}}}:{suffix}"

    def req(self, model: str, band: str = "normal") -> str:
        """Stream of one priority band's request entries (field `data`), consumer group CONSUMER_GROUP.
        The normal band keeps the plain name `req`; the others are `req:high` and `req:low`."""
        if band not in PRIORITY_BANDS:
            raise ValueError(f"priority band: expected one of {PRIORITY_BANDS}, found {band!r}")
        return self._model_key(model, "req" if band == "normal" else f"req:{band}")

    def req_streams(self, model: str) -> list[str]:
        """The model's request streams, one per band in PRIORITY_BANDS order (highest first)."""
        return [self.req(model, band) for band in PRIORITY_BANDS]

    def ids(self, model: str) -> str:
        """Hash request_id -> stream entry id, for idempotent enqueue."""
        return self._model_key(model, "ids")

    def limits(self, model: str) -> str:
        """Hash written by the serving worker; its existence means the model is served."""
        return self._model_key(model, "limits")

    def stats(self, model: str) -> str:
        """Hash of the model's live counters, refreshed by the worker every second."""
        return self._model_key(model, "stats")

    def cancel(self, model: str) -> str:
        """Set of request ids whose cancellation was asked."""
        return self._model_key(model, "cancel")

    def arq_queue(self, model: str) -> str:
        """arq's job queue (a sorted set) of the model's `generate` jobs: only workers serving the model
        listen on it (worker/arq_app.py)."""
        return self._model_key(model, "arq")

    def dlq(self, model: str) -> str:
        """Dead-letter stream of the model."""
        return self._model_key(model, "dlq")

    def events(self, request_id: str) -> str:
        """Reply stream of one request (field `data` = one encoded event)."""
        return f"{self.prefix}:{{r:{check_request_id(request_id)}}}:events"

    def workers(self) -> str:
        """Hash worker_id -> status document."""
        return f"{self.prefix}:workers"

    def heartbeat(self, worker_id: str) -> str:
        """String with a TTL, refreshed by the worker only while its engine thread makes progress (or
        is idle): gone means the worker or its engine is stuck (`layermux status --alive`)."""
        return f"{self.prefix}:heartbeat:{worker_id}"

    def models(self) -> str:
        """Set of the names of served models."""
        return f"{self.prefix}:models"
