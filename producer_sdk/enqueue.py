"""Owns: loading the atomic enqueue script (enqueue.lua) and reading its reply.
Changed by: protocol changes only; the script's contract is documented at its top.
Thread-safety: pure functions; the script source is read once and cached.

A full queue or an unknown model is a normal outcome here (`EnqueueOutcome.status`), not an
exception: the clients decide what to raise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final, Literal, TypeAlias

from .errors import ProtocolError
from .keys import PRIORITY_BANDS, Keys, priority_band

__all__ = ["EnqueueOutcome", "EnqueueStatus", "enqueue_args", "enqueue_keys", "enqueue_script_source", "parse_enqueue_reply"]

ENQUEUE_SCRIPT_FILE: Final = "enqueue.lua"

EnqueueStatus: TypeAlias = Literal["ok", "exists", "unknown_model", "queue_full"]


@functools.cache
def enqueue_script_source() -> str:
    """The Lua source of the enqueue script, shipped as package data next to this module."""
    return resources.files(__package__ or "producer_sdk").joinpath(ENQUEUE_SCRIPT_FILE).read_text("utf-8")


def enqueue_keys(keys: Keys, model: str) -> list[str]:
    """KEYS of the script, in its order: the request streams (high, normal, low), ids hash, limits hash."""
    return [*keys.req_streams(model), keys.ids(model), keys.limits(model)]


def enqueue_args(request_id: str, payload: bytes, priority: int) -> list[str | bytes | int]:
    """ARGV of the script: request id, payload, and the 1-based index of the priority's band."""
    return [request_id, payload, PRIORITY_BANDS.index(priority_band(priority)) + 1]


@dataclass(frozen=True, slots=True)
class EnqueueOutcome:
    """What the script did. `entry_id` for ok/exists; `depth` and `limit` for queue_full."""

    status: EnqueueStatus
    entry_id: str | None = None
    depth: int | None = None
    limit: int | None = None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_enqueue_reply(reply: Sequence[object]) -> EnqueueOutcome:
    """Turn the script's array reply into an EnqueueOutcome (raises ProtocolError if malformed)."""
    if not reply:
        raise ProtocolError("invalid_reply", f"enqueue script: expected a non-empty array, found {reply!r}")
    status = _text(reply[0])
    if status in ("ok", "exists") and len(reply) == 2:
        return EnqueueOutcome(status="ok" if status == "ok" else "exists", entry_id=_text(reply[1]))
    if status == "unknown_model" and len(reply) == 1:
        return EnqueueOutcome(status="unknown_model")
    if status == "queue_full" and len(reply) == 3:
        depth, limit = reply[1], reply[2]
        if isinstance(depth, int) and isinstance(limit, int):
            return EnqueueOutcome(status="queue_full", depth=depth, limit=limit)
    raise ProtocolError("invalid_reply", f"enqueue script: unexpected reply {reply!r}")
