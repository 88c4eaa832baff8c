"""`layermux status`: a read-only snapshot of what workers publish in Redis.

Owns: reading P:models, P:{m:<model>}:limits / :stats, XLEN P:{m:<model>}:req and
P:workers, and rendering them as human tables or one JSON object. Writes nothing.
Thread-safety: stateless functions; each call uses only the client it is given.

The snapshot is plain data (`collect`), rendering is a pure function of it (`render`),
so the demo and tests reuse both halves without a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO, cast

import orjson
import redis
import redis.backoff
import redis.retry

from producer_sdk.keys import PRIORITY_BANDS, Keys, check_model_name

# A worker refreshes P:workers every second; one not heard from for this long is
# shown as stale (it may have died; its entry stays until someone removes it).
STALE_AFTER_S = 10.0
# Socket timeouts of `status`; the liveness probe (`--alive`) makes one attempt with PROBE_TIMEOUT_S,
# so that it answers within Kubernetes' timeoutSeconds (10 s in deploy/k8s/worker.yaml) even when a
# Cluster node or a Sentinel does not answer.
TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def humanize_bytes(n_bytes: float | None) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits, '-' for unknown."""
    if n_bytes is None or (isinstance(n_bytes, float) and math.isnan(n_bytes)):
        return "-"
    value = float(n_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    unit = 0
    while value >= 1024.0 and unit < len(_BYTE_UNITS) - 1:
        value /= 1024.0
        unit += 1
    if unit == 0:
        return f"{sign}{int(value)} B"
    text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{sign}{text} {_BYTE_UNITS[unit]}"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _scalar(value: bytes | str) -> int | float | str:
    """Hash fields are strings on the wire; give numbers back as numbers."""
    text = _text(value)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, int | float | str]:
    return {_text(k): _scalar(v) for k, v in sorted(raw.items())}


def _is_model_name(name: str) -> bool:
    try:
        check_model_name(name)
    except ValueError:
        return False
    return True


def collect(client: redis.Redis, prefix: str, now: float | None = None) -> dict[str, Any]:
    """One consistent-enough snapshot (a single pipeline round trip per section).

    Returns {prefix, at, models: {name: {backlog, backlog_by_band, limits, stats}}, workers: {id: {...,
    age_s, stale}}}. A worker entry that is not valid JSON is kept as {"error": ...}
    rather than failing the whole command.
    """
    now = time.time() if now is None else now
    keys = Keys(prefix)
    # A name that is not a valid model name cannot have keys; it is skipped, not fatal.
    members = cast("set[bytes]", client.smembers(keys.models()))
    names = sorted(n for n in map(_text, members) if _is_model_name(n))
    pipe = client.pipeline(transaction=False)
    n_bands = len(PRIORITY_BANDS)
    for name in names:
        for stream in keys.req_streams(name):
            pipe.xlen(stream)
        pipe.hgetall(keys.limits(name))
        pipe.hgetall(keys.stats(name))
    replies = pipe.execute()
    models: dict[str, Any] = {}
    per_model = n_bands + 2
    for i, name in enumerate(names):
        row = replies[per_model * i : per_model * (i + 1)]
        by_band = {band: int(n) for band, n in zip(PRIORITY_BANDS, row[:n_bands])}
        limits, stats = row[n_bands:]
        models[name] = {
            "backlog": sum(by_band.values()),
            "backlog_by_band": by_band,
            "limits": _decode_hash(limits),
            "stats": _decode_hash(stats),
        }
    workers: dict[str, Any] = {}
    registered = cast("dict[bytes, bytes]", client.hgetall(keys.workers()))
    beats = heartbeats(client, prefix, [_text(w) for w in sorted(registered)])
    for worker_id, payload in sorted(registered.items()):
        try:
            entry = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            entry = f"not JSON ({e})"
        if not isinstance(entry, dict):
            workers[_text(worker_id)] = {"error": f"unreadable worker entry: {str(entry)[:200]}"}
            continue
        updated_at = entry.get("updated_at")
        if isinstance(updated_at, (int, float)):
            entry["age_s"] = round(max(0.0, now - updated_at), 3)
            entry["stale"] = now - updated_at > STALE_AFTER_S
        entry["heartbeat"] = beats[_text(worker_id)]
        workers[_text(worker_id)] = entry
    return {"prefix": prefix, "at": now, "models": models, "workers": workers}


def heartbeats(client: redis.Redis, prefix: str, worker_ids: Sequence[str]) -> dict[str, bool]:
    """Whether each worker's heartbeat key exists: the worker refreshes it only while its engine
    thread makes progress or is idle (worker/runtime.py), so False means stuck or gone."""
    pipe = client.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.exists(Keys(prefix).heartbeat(worker_id))
    return {w: bool(n) for w, n in zip(worker_ids, pipe.execute())}


def live_workers_serving(client: redis.Redis, prefix: str, model: str, now: float | None = None) -> list[str]:
    """Ids of the workers whose P:workers entry lists `model` and was refreshed within STALE_AFTER_S."""
    now = time.time() if now is None else now
    live = []
    for worker_id, payload in cast("dict[bytes, bytes]", client.hgetall(Keys(prefix).workers())).items():
        try:
            entry = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("models"), dict):
            continue
        updated_at = entry.get("updated_at")
        if model in entry["models"] and isinstance(updated_at, (int, float)) and now - updated_at <= STALE_AFTER_S:
            live.append(_text(worker_id))
    return sorted(live)


# ---------------------------------------------------------------------------- rendering


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned first column, right-aligned others; two spaces between columns."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _num(d: Mapping[str, Any], key: str) -> Any:
    value = d.get(key)
    return value if isinstance(value, (int, float)) else None


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.0f} ms"


def _refused(stats: Mapping[str, Any]) -> int:
    return sum(v for k, v in stats.items() if k.startswith("refused_") and isinstance(v, int))


def render_models(snapshot: Mapping[str, Any]) -> str:
    rows = []
    for name, m in snapshot["models"].items():
        stats, limits = m["stats"], m["limits"]
        rows.append(
            (
                name,
                m["backlog"],
                _num(limits, "max_backlog"),
                _num(stats, "running"),
                _num(stats, "admitted"),
                _num(stats, "done"),
                _num(stats, "errors"),
                _refused(stats),
                _ms(stats.get("queue_wait_p50_ms")),
                _ms(stats.get("queue_wait_p99_ms")),
                _num(limits, "n_ctx"),
                stats.get("worker"),
            )
        )
    headers = (
        "MODEL",
        "BACKLOG",
        "MAX",
        "RUNNING",
        "ADMITTED",
        "DONE",
        "ERRORS",
        "REFUSED",
        "WAIT p50",
        "WAIT p99",
        "N_CTX",
        "WORKER",
    )
    return format_table(headers, rows)


def _pick(d: Mapping[str, Any], *keys: str) -> Any:
    """First present key: worker entries name a few fields in more than one place."""
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def render_ledger(worker_id: str, entry: Mapping[str, Any]) -> str:
    """One worker's device ledger: totals line, settings line, per-model table."""
    if "error" in entry and "ledger" not in entry:
        return f"worker {worker_id}: {entry['error']}"
    ledger: Mapping[str, Any] = entry.get("ledger") or {}
    age = entry.get("age_s")
    head = f"worker {worker_id}"
    if isinstance(age, (int, float)):
        head += f"  (updated {age:.1f} s ago{', STALE' if entry.get('stale') else ''})"
    if entry.get("heartbeat") is False:
        head += "  NO HEARTBEAT: the engine thread made no progress within heartbeat_ttl_s"
    budget = _pick(ledger, "budget_bytes")
    cap = _pick(ledger, "cap_bytes")
    used = _pick(ledger, "used_bytes")
    headroom = _pick(ledger, "headroom_bytes")
    used_pct = f" ({100.0 * used / cap:.0f} % of cap)" if used is not None and cap else ""
    lines = [
        head,
        (
            f"  device: budget {humanize_bytes(budget)}  cap {humanize_bytes(cap)}"
            f"  used {humanize_bytes(used)}{used_pct}  headroom {humanize_bytes(headroom)}"
        ),
    ]
    settings = []
    for label, keys in (
        ("device", ("device",)),
        ("eviction", ("eviction", "eviction_policy")),
        ("prefetch depth", ("prefetch_depth",)),
        ("isa", ("isa",)),
        ("threads", ("n_threads",)),
        ("matmul", ("matmul_precision",)),
        ("link GB/s", ("link_gbps",)),
        ("priority aging", ("priority_aging_s",)),
    ):
        value = _pick(ledger, *keys)
        if value is None:
            value = _pick(entry, *keys)
        if label == "link GB/s" and value is None and "link_gbps" in entry:
            value = "unthrottled"  # link_gbps unset: copies run at memory speed
        if label == "threads" and value == 0:
            value = "auto"  # n_threads 0: one per core
        if value is not None:
            settings.append(f"{label} {value}")
    if settings:
        lines.append("  " + "  ".join(settings))
    engine = _mapping(entry.get("engine"))
    if engine.get("n_steps"):
        generated = engine.get("n_tokens_generated") or 0
        copied = engine.get("bytes_copied") or 0
        per_token = f" ({humanize_bytes(copied // generated)}/token)" if generated else ""
        step_ms = engine.get("step_ms_total") or 0.0
        wait_ms = engine.get("copy_wait_ms") or 0.0
        wait_pct = f" ({100.0 * wait_ms / step_ms:.1f} % of step time)" if step_ms else ""
        lines.append(f"  engine: {engine['n_steps']} steps  {generated} tokens  copied {humanize_bytes(copied)}"
                     f"{per_token}  copy wait {wait_ms:.0f} ms{wait_pct}  turns {engine.get('n_turns', 0)}"
                     f" ({engine.get('n_borrow_turns', 0)} borrowing)")
    per_model: Mapping[str, Any] = ledger.get("models") or {}
    info = _mapping(entry.get("models"))
    queues = _mapping(entry.get("queues"))
    names = list(per_model) + [n for n in info if n not in per_model]
    rows = []
    for name in names:
        booked = per_model.get(name) or {}
        meta = info.get(name) or {}
        queue = queues.get(name) or {}
        merged = {**queue, **meta, **booked}
        resident = _pick(merged, "residency", "resident")
        if isinstance(resident, bool):
            resident = "resident" if resident else "streamed"
        rows.append(
            (
                name,
                humanize_bytes(_pick(booked, "weights_bytes")),
                humanize_bytes(_pick(booked, "kv_bytes")),
                humanize_bytes(_pick(booked, "workspace_bytes")),
                resident,
                _pick(merged, "sched_weight", "weight", "scheduling_weight"),
                _pick(merged, "n_running", "running"),
                _pick(merged, "n_waiting", "waiting"),
            )
        )
    if rows:
        headers = ("MODEL", "WEIGHTS", "KV", "WORKSPACE", "RESIDENCY", "SCHED_W", "RUNNING", "WAITING")
        lines.extend("  " + line for line in format_table(headers, rows).splitlines())
    return "\n".join(lines)


def render(snapshot: Mapping[str, Any]) -> str:
    """The whole `layermux status` screen as text."""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot["at"]))
    out = [f"layermux status  prefix={snapshot['prefix']}  at {at}", ""]
    if snapshot["models"]:
        out.append(render_models(snapshot))
    else:
        out.append(f"no models served ({Keys(snapshot['prefix']).models()} is empty: is a worker running?)")
    out.append("")
    if snapshot["workers"]:
        for worker_id, entry in snapshot["workers"].items():
            out.append(render_ledger(worker_id, entry))
            out.append("")
    else:
        out.append("no workers registered")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def connect(redis_url: str, target: Mapping[str, Any] | None = None, *, timeout_s: float = TIMEOUT_S,
            retries: int | None = None) -> redis.Redis:
    """A blocking client for `redis_url` in the Redis form `target` names (mode / urls / sentinel_master,
    as the CLI reads them; None: standalone): the SDK's client under Cluster and Sentinel, so that
    keys on any node and a promoted master are found. `retries` None: redis-py's / the SDK's defaults."""
    if target is not None and target.get("mode", "standalone") != "standalone":
        from producer_sdk.connection import make_sync_client

        return make_sync_client(redis_url, **target, timeout_s=timeout_s, retries=retries)
    if retries is None:
        return redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=redis.retry.Retry(redis.backoff.NoBackoff(), retries))


def run(redis_url: str, prefix: str, as_json: bool, watch_s: float | None, out: TextIO = sys.stdout,
        target: Mapping[str, Any] | None = None) -> int:
    """Print one snapshot, or one every `watch_s` seconds until interrupted.

    Watching with --json prints one JSON object per line (NDJSON), so the stream can be
    piped into `jq -c`. On a terminal, each human snapshot redraws the screen.
    """
    client = connect(redis_url, target)
    try:
        while True:
            snapshot = collect(client, prefix)
            if as_json:
                out.write(orjson.dumps(snapshot, option=orjson.OPT_SORT_KEYS).decode() + "\n")
            else:
                if watch_s is not None and out.isatty():
                    out.write("\x1b[H\x1b[2J")
                out.write(render(snapshot))
            out.flush()
            if watch_s is None:
                return 0
            time.sleep(watch_s)
    finally:  # Ctrl-C ends --watch: KeyboardInterrupt reaches the CLI, which exits 130
        client.close()
