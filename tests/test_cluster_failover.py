"""Failover: a Redis master is killed (SIGKILL) while 3 models x many requests are in flight.

Redis Cluster (3 masters, 3 replicas, cluster-node-timeout 1 s): the master that serves one
model's slot (and about a third of the reply streams) dies; its replica is promoted. Sentinel
(one master, one replica, three Sentinels): the master dies; the Sentinels promote the replica
and clients follow. Workers are `layermux worker` processes, the producer is the SDK. Every
accepted request must still end with exactly one terminal event, the SDK must see each token
index once and the tokens of an undisturbed run; requests whose entry the failover lost are
resubmitted by their handles (handle.py, "Lost entries"). A third test cuts the replica's link
before the kill, so that two seconds of acknowledged writes (enqueues, deliveries, acks, reply events,
fences) are lost for sure; it once hung in about 1 run of 8 (issue 17: a run stopped by its lost
writes after it had finished kept its entry's lease, see worker/publisher.py `_fenced`). The figures
are printed on one `[faults]` line (pytest -s). Nothing asserts on time; timeouts bound waits only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from faultlib import REPO, Fleet, RequestSpec, Tally, make_models, raw_events, reference_output, stream_view, wait_until
from redis.crc import key_slot
from redis_cluster import RedisClusterLauncher, SentinelLauncher

from producer_sdk.connection import make_sync_client
from producer_sdk.keys import CONSUMER_GROUP, PRIORITY_BANDS, Keys
from producer_sdk.protocol import decode_event

WAIT_S = 180.0  # bounds waits only
N_PER_MODEL = 30


# The producer is its own process (as in production): it submits every request, reads each one's
# events concurrently through the SDK and writes what it saw. (redis-py 5.x's asyncio clients
# drop the node objects of a failed master with their sockets open: ResourceWarnings that the
# strict warning filter would turn into errors in this process, though nothing of ours leaks.)
PRODUCER = r"""
import asyncio, sys
import orjson
from producer_sdk import AsyncProducer
from producer_sdk.protocol import encode_event

mode, url, urls, master, prefix, specs_path, report_path = sys.argv[1:8]
specs = orjson.loads(open(specs_path, "rb").read())

async def one(producer, s):
    await asyncio.sleep(s.get("delay_s", 0.0))
    h = await producer.submit(s["model"], prompt_ids=s["prompt_ids"], max_tokens=s["max_tokens"],
                              temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"],
                              ignore_eos=s["ignore_eos"], request_id=s["request_id"])
    events, error = [], None
    try:
        async for ev in h.events():
            events.append(encode_event(ev).decode())
    except Exception as e:
        error = repr(e)
    return s["request_id"], {"events": events, "resubmits": h.resubmits, "error": error}

async def main():
    async with AsyncProducer(url, prefix=prefix, redis_mode=mode, redis_urls=orjson.loads(urls),
                             sentinel_master=master or None) as producer:
        return dict(await asyncio.gather(*(one(producer, s) for s in specs)))

open(report_path, "wb").write(orjson.dumps(asyncio.run(main())))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("failover-models"))


def failover_specs(names: list[str], tag: str) -> list[RequestSpec]:
    rng = random.Random(1717)
    return [RequestSpec(request_id=f"{tag}-{m}-{i:02d}", model=m,
                        prompt_ids=tuple(rng.randrange(3, 470) for _ in range(rng.randint(2, 12))),
                        max_tokens=rng.randint(120, 260), temperature=rng.choice([0.0, 0.8]),
                        top_k=0, top_p=1.0, seed=rng.randrange(2**63), ignore_eos=True)
            for m in names for i in range(N_PER_MODEL)]


def stuck_report(client: redis.Redis, keys: Keys, specs: list[RequestSpec]) -> str:
    """Where each request without a terminal event stands in Redis: its ids field, whether that entry
    is still in its stream, pending (to whom, idle, deliveries) or behind the group's last-delivered id,
    and what its reply stream holds. Printed when the producer hangs."""
    lines = []
    c: Any = client  # redis-py's sync/async union types
    for s in specs:
        events = raw_events(client, keys, s.request_id)
        view = stream_view(events)
        if view.n_terminal:
            continue
        entry = c.hget(keys.ids(s.model), s.request_id)
        where = []
        for band, stream in zip(PRIORITY_BANDS, keys.req_streams(s.model)):
            groups = {g["name"].decode(): g for g in c.xinfo_groups(stream)} if c.exists(stream) else {}
            last = groups.get(CONSUMER_GROUP, {}).get("last-delivered-id")
            if entry is not None and c.xrange(stream, entry, entry):
                pend = c.xpending_range(stream, CONSUMER_GROUP, min=entry, max=entry, count=1)
                where.append(f"{band}: entry {entry.decode()} in the stream, last-delivered {last!r}, pending "
                             f"{[(p['consumer'], p['time_since_delivered'], p['times_delivered']) for p in pend]}")
        lines.append(f"{s.request_id}: ids field {entry!r}; {'; '.join(where) or 'entry in no stream'}; reply stream: "
                     f"{len(events)} events, {len(view.token_ids)} tokens, attempts {view.attempts}")
    return "\n".join(lines) or "(none: every stored reply stream has its terminal event)"


def run_and_kill(tmp: Path, target: dict[str, Any], prefix: str, specs: list[RequestSpec], client: redis.Redis,
                 kill: Any, kill_after_tokens: int, tally: Tally, pace_s: float = 0.0,
                 logs: Any = lambda: "") -> dict[str, Any]:
    """Run the producer process; once the reply streams hold `kill_after_tokens` tokens (and no request
    has finished), call kill(). Returns request_id -> (events, resubmits, error) as the producer saw them.
    If the producer hangs, fails with stuck_report() and `logs()` (the workers' log tails)."""
    specs_path, report_path = tmp / "specs.json", tmp / "report.json"
    specs_path.write_bytes(orjson.dumps([{**dataclasses.asdict(s), "delay_s": i * pace_s} for i, s in enumerate(specs)]))
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, target["mode"], target["url"],
                             orjson.dumps(target["urls"]).decode(), target.get("sentinel_master") or "", prefix,
                             str(specs_path), str(report_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    keys = Keys(prefix)
    try:
        def tokens() -> int:
            return sum(len(stream_view(raw_events(client, keys, s.request_id)).token_ids) for s in specs)
        wait_until(lambda: proc.poll() is not None or tokens() >= kill_after_tokens, WAIT_S, "tokens to flow")
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        unfinished = sum(stream_view(raw_events(client, keys, s.request_id)).n_terminal == 0 for s in specs)
        assert unfinished >= len(specs) // 3, f"only {unfinished} requests were in flight at the kill"
        tally.add("in_flight_at_kill", unfinished)
        kill()
        try:
            out, _ = proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the producer did not finish within {WAIT_S} s; requests whose stored reply "
                                 "stream has no terminal event (some may have been read before the failover lost "
                                 f"it):\n{stuck_report(client, keys, specs)}\n{logs()}") from None
        assert proc.returncode == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    report = orjson.loads(report_path.read_bytes())
    return {rid: ([decode_event(e) for e in r["events"]], r["resubmits"], r["error"])
            for rid, r in report.items()}


def judge(seen: dict[str, Any], specs: list[RequestSpec], reference: dict[str, tuple[list[int], str]],
          tally: Tally) -> list[str]:
    problems = []
    for s in specs:
        events, resubmits, error = seen[s.request_id]
        tally.add("requests")
        tally.add("resubmitted", int(resubmits > 0))
        view = stream_view(events)
        if error is not None or (view.token_ids, view.text) != reference[s.request_id] or view.gaps:
            tally.add("lost")
            problems.append(f"{s.request_id}: error {error}, {len(view.token_ids)} tokens of "
                            f"{len(reference[s.request_id][0])}, gaps {view.gaps}")
        if view.repeated or view.n_terminal != 1:
            tally.add("duplicated")
            problems.append(f"{s.request_id}: repeated {view.repeated}, terminals {view.n_terminal}")
        tally.add("takeovers", max(0, view.attempts - 1))
    return problems


@pytest.mark.slow
def test_cluster_master_killed_mid_run_every_request_ends_once(models: dict[str, Path], tmp_path: Path) -> None:
    prefix = "fo"
    names = sorted(models)
    keys = Keys(prefix)
    tally = Tally("cluster failover")
    with RedisClusterLauncher(tmp_path / "cluster") as cluster:
        fleet = Fleet(tmp_path, cluster.url, prefix, models, {
            "redis_mode": "cluster", "redis_urls": cluster.urls[1:], "stats_interval_s": 0.25,
            "lease_idle_ms": 3000, "max_deliveries": 50})
        specs = failover_specs(names, "c")
        victim_key = keys.req(names[0])
        killed: list[int] = []

        def kill() -> None:
            killed.append(cluster.kill_master_of(victim_key).port)

        client = make_sync_client(cluster.url, mode="cluster", urls=cluster.urls[1:])
        try:
            for wid in ("w1", "w2"):
                fleet.start(wid)
            for p in fleet.procs:
                p.wait_ready(client)
            target = {"mode": "cluster", "url": cluster.url, "urls": cluster.urls[1:]}
            seen = run_and_kill(tmp_path, target, prefix, specs, client, kill, 1500, tally, logs=fleet.logs)
            assert cluster.wait_promoted(victim_key, killed[0]) != killed[0]
            reference = reference_output(models, specs)
            problems = judge(seen, specs, reference, tally)
            tally.figures.setdefault("lost", 0)
            tally.figures.setdefault("duplicated", 0)
            tally.report()
            assert not problems, "\n".join(problems[:20]) + "\n" + fleet.logs()
        finally:
            client.close()
            fleet.close()


@pytest.mark.slow
def test_sentinel_master_killed_mid_run_clients_follow_and_every_request_ends_once(
        models: dict[str, Path], tmp_path: Path) -> None:
    prefix = "fs"
    names = sorted(models)
    tally = Tally("sentinel failover")
    with SentinelLauncher(tmp_path / "sentinel") as sentinels:
        urls = sentinels.urls
        fleet = Fleet(tmp_path, urls[0], prefix, models, {
            "redis_mode": "sentinel", "redis_urls": urls[1:], "sentinel_master": sentinels.name,
            "stats_interval_s": 0.25, "lease_idle_ms": 3000, "max_deliveries": 50})
        specs = failover_specs(names, "s")[: 2 * N_PER_MODEL]
        old: list[int] = []

        def kill() -> None:
            old.append(sentinels.kill_master().port)

        client = make_sync_client(urls[0], mode="sentinel", urls=urls[1:], sentinel_master=sentinels.name)
        try:
            for wid in ("w1", "w2"):
                fleet.start(wid)
            for p in fleet.procs:
                p.wait_ready(client)
            target = {"mode": "sentinel", "url": urls[0], "urls": urls[1:], "sentinel_master": sentinels.name}
            seen = run_and_kill(tmp_path, target, prefix, specs, client, kill, 1000, tally, logs=fleet.logs)
            assert sentinels.master_port() != old[0]
            reference = reference_output(models, specs)
            problems = judge(seen, specs, reference, tally)
            tally.figures.setdefault("lost", 0)
            tally.figures.setdefault("duplicated", 0)
            tally.report()
            assert not problems, "\n".join(problems[:20]) + "\n" + fleet.logs()
        finally:
            client.close()
            fleet.close()


@pytest.mark.slow
def test_cluster_master_killed_while_its_replica_lags_writes_are_lost_and_every_request_still_ends_once(
        models: dict[str, Path], tmp_path: Path) -> None:
    """The replica of one master loses its link and stalls for 5 s (CLIENT KILL TYPE master, DEBUG
    SLEEP); the master is killed 2 s into that, while a producer keeps submitting: what the master acknowledged
    in those seconds - enqueues of one model, deliveries, reply events, acks - is gone after the promotion.
    The handles resubmit the lost enqueues, runs whose events were lost stop and are resumed; every request
    still ends once with the undisturbed tokens. (With a 2 s window the issue 17 hang and the reader's
    ProtocolError showed in 3 of 4 runs before their fixes; with 1 s, in about 1 of 8.)"""
    prefix = "fl"
    names = sorted(models)
    keys = Keys(prefix)
    tally = Tally("cluster failover, replica lagging")
    with RedisClusterLauncher(tmp_path / "cluster") as cluster:
        fleet = Fleet(tmp_path, cluster.url, prefix, models, {
            "redis_mode": "cluster", "redis_urls": cluster.urls[1:], "stats_interval_s": 0.25,
            "lease_idle_ms": 3000, "max_deliveries": 50})
        specs = failover_specs(names, "l")
        victim_key = keys.req(names[0])
        killed: list[int] = []

        def stall_and_kill() -> None:
            master = cluster.node_of_slot(key_slot(victim_key.encode()))
            info = redis.Redis(host="127.0.0.1", port=master.port).info("replication")
            replica_port = int(info["slave0"]["port"])

            def sleep_replica() -> None:  # drop its link, then stall so that it cannot reconnect
                with contextlib.suppress(redis.RedisError):
                    r = redis.Redis(host="127.0.0.1", port=replica_port, socket_timeout=10)
                    r.execute_command("CLIENT", "KILL", "TYPE", "master")
                    r.execute_command("DEBUG", "SLEEP", 5)
            threading.Thread(target=sleep_replica, daemon=True).start()
            time.sleep(2.0)  # the master acknowledges writes its replica never gets
            master.kill()
            killed.append(master.port)

        client = make_sync_client(cluster.url, mode="cluster", urls=cluster.urls[1:])
        try:
            for wid in ("w1", "w2"):
                fleet.start(wid)
            for p in fleet.procs:
                p.wait_ready(client)
            target = {"mode": "cluster", "url": cluster.url, "urls": cluster.urls[1:]}
            seen = run_and_kill(tmp_path, target, prefix, specs, client, stall_and_kill, 300, tally, pace_s=0.08,
                                logs=fleet.logs)
            assert cluster.wait_promoted(victim_key, killed[0]) != killed[0]
            reference = reference_output(models, specs)
            problems = judge(seen, specs, reference, tally)
            tally.figures.setdefault("lost", 0)
            tally.figures.setdefault("duplicated", 0)
            tally.report()
            for line in problems[:4]:
                rid = line.split(":")[0]
                raw = [(type(e).__name__[:-5], getattr(e, "index", ""), len(getattr(e, "token_ids", [])))
                       for e in raw_events(client, keys, rid)]
                seen_ix = [(getattr(e, "index", ""), len(getattr(e, "token_ids", []))) for e in seen[rid][0]]
                print(rid, "stored:", raw, "\nseen:", seen_ix)
            assert not problems, "\n".join(problems[:20]) + "\n" + fleet.logs()
        finally:
            client.close()
            fleet.close()
