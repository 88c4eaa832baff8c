"""Owns: the worker's admission policy — when a consumer may read its next request, and which
requests can never run. Pure functions of plain numbers: no Redis, no engine, no clock.
Changed by: policy changes only (tests/test_worker_admission.py states the invariants).
Thread-safety: stateless; every function is pure.

Two gates, in order:

1. *Read gate* (`read_verdict`), asked before every XREADGROUP. The worker does not know the
   next prompt before reading it, so it reads only when the model could start a modest request
   now: fewer than `max_running` sequences running, and ledger headroom for a minimum
   reservation of KV (`MIN_RESERVATION_BLOCKS` blocks). Whatever cannot run yet stays in Redis,
   where an idle worker can take it. Past the minimum the engine itself preempts on KV pressure
   (swap or recompute), so a request that is read never makes the device run out of memory.

   Fair share. Models share the KV pool (headroom plus the KV already booked) in proportion to
   `sched_weight` among the models that have demand (running or waiting entries). A model at or
   above its share may keep reading only while the headroom left after its own reservation still
   covers one reservation for every *starving* model: one that has waiting entries, room under
   its `max_running`, and less than its share. A model under its share leaves the same room for
   every starving model *more starved than itself* (holding a smaller fraction of its share), so
   the most starved model is never held back by a fuller one. A hot model therefore cannot take
   the last blocks a cold one needs to start, and a lone model may still use the whole device.

   Starvation bound (property-tested in tests/test_worker_admission.py): when every model's
   minimum reservation fits within its weighted share of the cap, a model with backlog and room
   under its `max_running` reads within D + 1 rounds of gate checks, D being the longest any
   request holds its reservation: whatever blocks it is over its share and can only shrink.

2. *Request check* (`check_request`), once the prompt is tokenized: a request that could never
   run on this device is denied at once with the numbers, instead of waiting forever. Its KV
   need is compared with the most KV the device can ever hold: the cap less what is booked for
   good (weights of resident models or streaming slots, workspaces).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

__all__ = [
    "MIN_RESERVATION_BLOCKS",
    "Denial",
    "DeviceView",
    "ModelLoad",
    "ReadVerdict",
    "check_request",
    "fair_share_bytes",
    "kv_tokens_needed",
    "min_reservation_tokens",
    "read_verdict",
]

# KV blocks a model must be able to book before it reads another request.
MIN_RESERVATION_BLOCKS: Final = 4


def min_reservation_tokens(kv_block_tokens: int) -> int:
    """Tokens of KV the read gate reserves for a request it has not seen yet."""
    assert kv_block_tokens >= 1
    return kv_block_tokens * MIN_RESERVATION_BLOCKS


def kv_tokens_needed(prompt_tokens: int, max_tokens: int, n_ctx: int) -> int:
    """KV positions a request may occupy at its longest: the prompt plus every completion token, within n_ctx."""
    assert prompt_tokens >= 0 and max_tokens >= 0 and n_ctx >= 1
    return min(n_ctx, prompt_tokens + max_tokens)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model's numbers as the read gate sees them."""

    running: int  # sequences of this model in the engine (stream and job requests)
    max_running: int
    kv_bytes: int  # KV bytes the ledger books for the model now
    min_reservation_bytes: int  # kv_bytes_for(model, min_reservation_tokens(...))
    sched_weight: float = 1.0
    waiting: int = 0  # entries in Redis no worker has read yet (the model's unmet demand)


@dataclass(frozen=True, slots=True)
class DeviceView:
    """The device as the read gate sees it: ledger headroom and every served model's load."""

    headroom_bytes: int
    models: Mapping[str, ModelLoad] = field(default_factory=dict)


class ReadVerdict(StrEnum):
    OK = "ok"
    MAX_RUNNING = "max_running"  # the model's concurrency limit is reached
    NO_HEADROOM = "no_headroom"  # the ledger cannot book even the minimum reservation
    FAIR_SHARE = "fair_share"  # the model is over its share and another model is starving


def _active(view: DeviceView, model: str) -> list[str]:
    return [n for n, m in view.models.items() if n == model or m.running > 0 or m.waiting > 0]


def fair_share_bytes(model: str, view: DeviceView) -> int:
    """The model's weighted share of the KV pool among models with demand (itself included)."""
    active = _active(view, model)
    pool = max(0, view.headroom_bytes) + sum(view.models[n].kv_bytes for n in view.models)
    total_weight = sum(view.models[n].sched_weight for n in active)
    assert total_weight > 0
    return int(pool * view.models[model].sched_weight / total_weight)


def read_verdict(model: str, view: DeviceView) -> ReadVerdict:
    """May `model`'s consumer read (and so start) one more request now? See the module docstring."""
    me = view.models[model]
    assert me.max_running >= 1 and me.min_reservation_bytes >= 0
    if me.running >= me.max_running:
        return ReadVerdict.MAX_RUNNING
    if view.headroom_bytes < me.min_reservation_bytes:
        return ReadVerdict.NO_HEADROOM
    my_share = fair_share_bytes(model, view)
    over_share = me.kv_bytes >= my_share
    starving_reservations = 0
    for name, other in view.models.items():
        if name == model or other.waiting <= 0 or other.running >= other.max_running:
            continue
        share = fair_share_bytes(name, view)
        if other.kv_bytes >= share:
            continue
        # Over its share, a model leaves one reservation for every starving model; under it,
        # one for every model more starved than itself (a smaller fraction of its share held),
        # so the most starved model is never held back by a fuller one.
        if over_share or other.kv_bytes * max(my_share, 1) < me.kv_bytes * max(share, 1):
            starving_reservations += other.min_reservation_bytes
    if starving_reservations and view.headroom_bytes - me.min_reservation_bytes < starving_reservations:
        return ReadVerdict.FAIR_SHARE
    return ReadVerdict.OK


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request can never run here: an error code of the protocol, a message, and the numbers."""

    code: str
    message: str
    details: dict[str, int | float] = field(default_factory=dict)


def check_request(
    *,
    prompt_tokens: int,
    max_tokens: int,
    n_ctx: int,
    max_tokens_limit: int,
    needed_kv_bytes: int,
    cap_bytes: int,
    kv_capacity_bytes: int | None = None,
) -> Denial | None:
    """None if the request can run on this device; else the first reason it never can.

    Checked in order: the configured max_tokens limit, the context window (prompt alone, then
    prompt plus completion), then the KV the whole request needs against the device cap.
    `needed_kv_bytes` is kv_bytes_for(model, prompt_tokens + max_tokens). `kv_capacity_bytes`
    is what KV can ever get: the cap less the bytes booked for good (weights, workspaces); a
    request needing more would wait forever, so it is denied (default: the whole cap).
    """
    assert prompt_tokens >= 0 and max_tokens >= 1 and n_ctx >= 1 and max_tokens_limit >= 1
    if max_tokens > max_tokens_limit:
        return Denial(
            "max_tokens_over_limit",
            f"max_tokens {max_tokens} is over this model's limit of {max_tokens_limit}",
            {"needed": max_tokens, "limit": max_tokens_limit},
        )
    if prompt_tokens > n_ctx:
        return Denial(
            "prompt_too_long",
            f"the prompt has {prompt_tokens} tokens; the model's context window is {n_ctx}",
            {"needed_tokens": prompt_tokens, "limit_tokens": n_ctx,
             "prompt_tokens": prompt_tokens, "max_tokens": max_tokens},
        )
    if prompt_tokens + max_tokens > n_ctx:
        return Denial(
            "prompt_too_long",
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
            f"{prompt_tokens + max_tokens} tokens; the model's context window is {n_ctx}",
            {"needed_tokens": prompt_tokens + max_tokens, "limit_tokens": n_ctx,
             "prompt_tokens": prompt_tokens, "max_tokens": max_tokens},
        )
    available = cap_bytes if kv_capacity_bytes is None else min(cap_bytes, kv_capacity_bytes)
    if needed_kv_bytes > available:
        return Denial(
            "kv_exceeds_budget",
            f"the request needs {needed_kv_bytes} bytes of KV cache; this device can give KV at most "
            f"{available} bytes (cap {cap_bytes} bytes less weights and workspaces)",
            {"needed_bytes": needed_kv_bytes, "available_bytes": available, "limit_bytes": cap_bytes,
             "needed_tokens": prompt_tokens + max_tokens},
        )
    return None
