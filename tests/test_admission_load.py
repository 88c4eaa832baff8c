"""Admission under load, with real processes: one `layermux worker` process on a real redis-server,
producers in their own processes (tests/faultlib.py `offer`) or in this one.

1. Overload: producers offer far more than fits (the queue limit and the device together). No
   process crashes or runs out of memory (the ledger's peak stays under its cap), every refused
   offer got a typed error, every accepted request ends with exactly one terminal event, and the
   counts add up: offered = accepted + refused, accepted = done + error events.
2. Fairness: one model is flooded while another gets a trickle. The bound stated and checked is
   a count, not a time: while a trickle request waits (from its enqueue to its `started` event,
   both read on the Redis server's clock), the flooded model starts requests in at most
   FAIRNESS_BOUND admission rounds. A round is one millisecond of the server's clock with flood
   starts in it: the worker reads as many requests as fit in one read (consumer.py _READ_BATCH), so
   when a batch of flood requests ends together, their successors start within the same millisecond
   (seen: 14 starts 2 ms after a trickle request's enqueue, which itself started 3 ms later). A
   single FIFO queue would pass it over by the whole flood backlog, round after round.

The measured figures are printed on one `[admission]` line each (`pytest -s` shows them).
Nothing asserts on time; timeouts only bound waits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
import redis
from faultlib import TERMINAL, Fleet, ProducerProcs, Tally, make_models, pending_count, raw_events, wait_until

from engine import Engine, EngineConfig
from producer_sdk import Producer
from producer_sdk.keys import Keys
from producer_sdk.protocol import DoneEvent, StartedEvent

RESULT_TIMEOUT_S: Final = 600.0
CAP_FRACTION: Final = 0.9
PROMPT_TOKENS: Final = 16
MAX_TOKENS: Final = 48


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("admission-models"), ["ma", "mb"])


def budget_for(models: dict[str, Path], names: list[str], kv_sequences: int,
               tokens: int = PROMPT_TOKENS + MAX_TOKENS) -> int:
    """A device budget whose cap holds the models' weights and workspaces plus the KV of about
    `kv_sequences` requests of `tokens` tokens (measured on a probe engine)."""
    eng = Engine(EngineConfig(budget_bytes=1 << 30, n_threads=1))
    try:
        fixed = kv = 0
        for name in names:
            eng.load_model(name, models[name])
            booked = eng.ledger().models[name]
            fixed += booked.weights_bytes + booked.workspace_bytes
            kv = max(kv, eng.kv_bytes_for(name, tokens))
        return int((fixed + kv_sequences * kv) / CAP_FRACTION) + 1
    finally:
        eng.close()


def worker_ledger(client: redis.Redis, keys: Keys, worker_id: str) -> dict[str, Any]:
    raw = client.hget(keys.workers(), worker_id)
    assert raw is not None
    ledger: dict[str, Any] = orjson.loads(raw)["ledger"]
    return ledger


def assert_drained(client: redis.Redis, keys: Keys, names: list[str]) -> None:
    for m in names:
        wait_until(lambda m=m: sum(client.xlen(s) for s in keys.req_streams(m)) == 0, 60, f"{m}'s streams to empty")
        assert pending_count(client, keys, m) == 0
        assert client.hlen(keys.ids(m)) == 0
        assert client.xlen(keys.dlq(m)) == 0


# -- 1. overload --------------------------------------------------------------------------------------


MAX_BACKLOG: Final = 12
N_PRODUCERS: Final = 4
OFFERS_PER_PRODUCER: Final = 40  # 4 x (40 + 4) = 176 offers: > 10 x (queue limit 12 + device)


def offers_of(producer: int) -> list[dict[str, Any]]:
    out = []
    for i in range(OFFERS_PER_PRODUCER):
        out.append({"request_id": f"ov-{producer}-{i}", "model": "ma",
                    "prompt_ids": [(7 * i + producer) % 200 + 3] * PROMPT_TOKENS, "max_tokens": MAX_TOKENS})
        if i % 10 == 5:  # impossible work, refused by the worker with its numbers
            out.append({"request_id": f"ov-{producer}-{i}-long", "model": "ma", "prompt_ids": [5] * 2000,
                        "max_tokens": 4})
            out.append({"request_id": f"ov-{producer}-{i}-big", "model": "ma", "prompt_ids": [5] * 4,
                        "max_tokens": 5000})
        if i % 20 == 7:  # a model nobody serves
            out.append({"request_id": f"ov-{producer}-{i}-unknown", "model": "nobody", "prompt_ids": [5],
                        "max_tokens": 4})
    return out


@pytest.mark.slow
def test_overload_of_ten_times_capacity_refuses_with_types_and_loses_nothing(
        redis_url: str, client: redis.Redis, models: dict[str, Path], tmp_path: Path) -> None:
    prefix, keys = "ov", Keys("ov")
    budget = budget_for(models, ["ma"], kv_sequences=4)  # the device holds ~4 requests' KV
    fleet = Fleet(tmp_path, redis_url, prefix, {"ma": models["ma"]}, {
        "stats_interval_s": 0.2, "device": {"budget": budget, "n_threads": 1, "cap_fraction": CAP_FRACTION},
        "model_extra": {"max_backlog": MAX_BACKLOG, "max_running": 16}})
    producers: ProducerProcs | None = None
    tally = Tally("overload")
    try:
        worker = fleet.start("w-ov")
        worker.wait_ready(client)
        batches = [offers_of(i) for i in range(N_PRODUCERS)]
        offered = {o["request_id"]: o for batch in batches for o in batch}
        producers = ProducerProcs("offer", redis_url, prefix, batches, tmp_path)
        seen = producers.reports(RESULT_TIMEOUT_S)
        assert sorted(seen) == sorted(offered)

        refused = {rid: s for rid, s in seen.items() if "refused" in s}
        accepted = {rid: s for rid, s in seen.items() if "refused" not in s}
        for rid, s in refused.items():
            if offered[rid]["model"] == "nobody":
                assert (s["type"], s["refused"]) == ("UnknownModelError", "unknown_model"), (rid, s)
            else:
                assert (s["type"], s["refused"]) == ("QueueFullError", "queue_full"), (rid, s)
                assert s["details"]["limit"] == MAX_BACKLOG and s["details"]["depth"] >= MAX_BACKLOG, s
        done = {rid for rid, s in accepted.items() if s["terminal"] == "DoneEvent"}
        errors = {rid: s["code"] for rid, s in accepted.items() if s["terminal"] == "ErrorEvent"}
        assert all(s["n_terminal"] == 1 for s in accepted.values()), [s for s in accepted.values()
                                                                       if s["n_terminal"] != 1]
        assert len(offered) == len(accepted) + len(refused)
        assert len(accepted) == len(done) + len(errors)
        for rid in done:
            assert seen[rid]["completion_tokens"] == offered[rid]["max_tokens"], (rid, seen[rid])
        for rid, code in errors.items():
            want = "prompt_too_long" if rid.endswith("-long") else "max_tokens_over_limit"
            assert rid.endswith(("-long", "-big")) and code == want, (rid, code)
        n_queue_full = sum(s["refused"] == "queue_full" for s in refused.values())
        assert n_queue_full > 0 and len(done) > 0  # the overload happened and work went on

        assert worker.alive, worker.log_tail()
        ledger = worker_ledger(client, keys, "w-ov")
        assert ledger["peak_bytes"] <= ledger["cap_bytes"], ledger
        stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.stats("ma")).items()}
        wait_until(lambda: int(client.hget(keys.stats("ma"), "done") or 0) == len(done), 30, "stats to catch up")
        assert_drained(client, keys, ["ma"])
        worker.terminate()
        assert worker.wait() == 0, worker.log_tail()
        tally.figures.update({
            "offered": len(offered), "accepted": len(accepted), "refused_queue_full": n_queue_full,
            "refused_unknown_model": len(refused) - n_queue_full, "done": len(done),
            "error_events": len(errors), "ledger_peak_mib": round(ledger["peak_bytes"] / 2**20, 2),
            "ledger_cap_mib": round(ledger["cap_bytes"] / 2**20, 2),
            "queue_wait_p99_ms": stats.get("queue_wait_p99_ms")})
        tally.report()
    finally:
        if producers is not None:
            producers.kill()
        fleet.close()


# -- 2. fairness ---------------------------------------------------------------------------------------


FLOOD: Final = 96
FLOOD_TOKENS: Final = 256  # long enough that the flood outlasts the trickle
TRICKLE: Final = 8
TRICKLE_GAP_S: Final = 0.1
FLOOD_MAX_RUNNING: Final = 16
# A trickle request may be passed over by the rounds of flood starts that happen while it is read,
# tokenized and prefilled; the fair-share read gate and stride scheduling keep that to a few.
FAIRNESS_BOUND: Final = FLOOD_MAX_RUNNING // 2


def _ms(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, seq = text.split("-")
    return int(ms), int(seq)


def started_at(client: redis.Redis, keys: Keys, request_id: str) -> tuple[int, int]:
    [(entry_id, _fields)] = client.xrange(keys.events(request_id), count=1)
    assert isinstance(raw_events(client, keys, request_id)[0], StartedEvent)
    return _ms(entry_id)


@pytest.mark.slow
def test_a_flooded_model_does_not_starve_a_trickle(
        redis_url: str, client: redis.Redis, models: dict[str, Path], tmp_path: Path) -> None:
    prefix, keys = "fair", Keys("fair")
    # KV for ~6 requests: the flood alone could take all of it (max_running 16).
    budget = budget_for(models, ["ma", "mb"], kv_sequences=3, tokens=PROMPT_TOKENS + FLOOD_TOKENS)
    fleet = Fleet(tmp_path, redis_url, prefix, {"ma": models["ma"], "mb": models["mb"]}, {
        "stats_interval_s": 0.2, "device": {"budget": budget, "n_threads": 1, "cap_fraction": CAP_FRACTION},
        "model_extra": {"max_backlog": 1000, "max_running": FLOOD_MAX_RUNNING}})
    tally = Tally("fairness")
    try:
        worker = fleet.start("w-fair")
        worker.wait_ready(client)
        with Producer(redis_url, prefix=prefix) as producer:
            flood = [producer.submit("ma", prompt_ids=[11 + i % 50] * PROMPT_TOKENS, max_tokens=FLOOD_TOKENS,
                                     ignore_eos=True, request_id=f"flood-{i}") for i in range(FLOOD)]
            time.sleep(0.5)  # the flood is running and holds the device
            trickle = []
            for i in range(TRICKLE):
                trickle.append(producer.submit("mb", prompt_ids=[13 + i] * PROMPT_TOKENS, max_tokens=MAX_TOKENS,
                                               ignore_eos=True, request_id=f"trickle-{i}"))
                time.sleep(TRICKLE_GAP_S)
            results = {h.request_id: h.result(timeout=RESULT_TIMEOUT_S) for h in flood + trickle}
        assert all(len(results[h.request_id].token_ids) == FLOOD_TOKENS for h in flood)
        assert all(len(results[h.request_id].token_ids) == MAX_TOKENS for h in trickle)
        flood_starts = sorted(started_at(client, keys, h.request_id) for h in flood)
        passed_over = []
        for h in trickle:
            assert h.entry_id is not None
            enqueued, started = _ms(h.entry_id), started_at(client, keys, h.request_id)
            passed_over.append(len({s[0] for s in flood_starts if enqueued < s < started}))  # rounds (ms)
        # The flood really was still queueing while the trickle came: some flood request started
        # after the last trickle request was enqueued (else the test measured nothing).
        last_trickle = max(_ms(h.entry_id or "0-0") for h in trickle)
        assert flood_starts[-1] > last_trickle, "the flood ended before the trickle; nothing was measured"
        waits = {h.request_id: results[h.request_id].usage.queue_ms for h in flood + trickle}
        trickle_waits = sorted(waits[h.request_id] for h in trickle)
        flood_waits = sorted(waits[h.request_id] for h in flood)
        tally.figures.update({
            "flood": FLOOD, "trickle": TRICKLE, "bound": FAIRNESS_BOUND,
            "passed_over_max": max(passed_over), "passed_over": passed_over,
            "trickle_queue_ms_p50": round(trickle_waits[len(trickle_waits) // 2], 1),
            "trickle_queue_ms_max": round(trickle_waits[-1], 1),
            "flood_queue_ms_p50": round(flood_waits[len(flood_waits) // 2], 1),
            "flood_queue_ms_max": round(flood_waits[-1], 1)})
        tally.report()
        assert max(passed_over) <= FAIRNESS_BOUND, (passed_over, worker.log_tail())
        for h in trickle:
            events = raw_events(client, keys, h.request_id)
            assert sum(isinstance(e, TERMINAL) for e in events) == 1 and isinstance(events[-1], DoneEvent)
        assert_drained(client, keys, ["ma", "mb"])
    finally:
        fleet.close()
