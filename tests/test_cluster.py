"""Redis Cluster: every Lua script within one slot, and the end-to-end behaviours on a real
3-master / 3-replica cluster (tests/redis_cluster.py) — exactly once, resume after a worker is
killed, cancel, priorities, admission — with `layermux worker` processes in redis_mode cluster
and the SDK's cluster client. The failover tests (a master killed mid-run) are in
tests/test_cluster_failover.py.

Real processes and real servers throughout; nothing asserts on time (timeouts bound waits only).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from faultlib import Fleet, RequestSpec, make_models, raw_events, reference_output, stream_view, wait_until
from redis.cluster import key_slot
from redis.exceptions import RedisClusterException
from redis_cluster import RedisClusterLauncher, SentinelLauncher

from producer_sdk import AsyncProducer, Producer, QueueFullError, UnknownModelError, WorkerFailureError
from producer_sdk.connection import make_async_client, make_sync_client
from producer_sdk.enqueue import enqueue_args, enqueue_keys, enqueue_script_source
from producer_sdk.keys import CONSUMER_GROUP, Keys
from producer_sdk.protocol import CancelledEvent, DoneEvent, StartedEvent, TokenEvent, Usage, decode_event, encode_event
from worker import consumer as consumer_mod
from worker import publisher as publisher_mod

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 120.0  # bounds waits only
USAGE = Usage(prompt_tokens=2, completion_tokens=0, queue_ms=0.0, prefill_ms=0.0, decode_ms=0.0, total_ms=0.0)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterLauncher]:
    with RedisClusterLauncher(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def cclient(cluster: RedisClusterLauncher) -> Iterator[redis.Redis]:
    """A blocking cluster client through the SDK's factory; the cluster is emptied first."""
    c = make_sync_client(cluster.url, mode="cluster", urls=cluster.urls[1:])
    c.flushall(target_nodes="primaries")  # type: ignore[call-arg]
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("cluster-models"))


# -- every script, one slot ------------------------------------------------------------------------------

# Every script the code registers, by the name it is registered under.
SCRIPTS: dict[str, str] = {
    "enqueue_script_source()": enqueue_script_source(),
    "_PICK_SCRIPT": consumer_mod._PICK_SCRIPT,
    "_PRUNE_SCRIPT": consumer_mod._PRUNE_SCRIPT,
    "_RENEW_SCRIPT": consumer_mod._RENEW_SCRIPT,
    "_APPEND_SCRIPT": publisher_mod._APPEND_SCRIPT,
    "_APPEND_MANY_SCRIPT": publisher_mod._APPEND_MANY_SCRIPT,
    "_FENCE_SCRIPT": publisher_mod._FENCE_SCRIPT,
    "_ACK_SCRIPT": publisher_mod._ACK_SCRIPT,
}


def test_the_script_list_is_every_script_in_the_tree() -> None:
    """A tripwire: a new register_script / EVAL / .lua file must be added to SCRIPTS (and run below)."""
    registered: set[str] = set()
    raw_eval: list[str] = []
    for path in [*REPO.glob("producer_sdk/**/*.py"), *REPO.glob("worker/**/*.py")]:
        text = path.read_text()
        registered.update(re.findall(r"register_script\(([^)]*\)?)\)", text))
        for m in re.finditer(r"\.(eval|evalsha)\(|\"EVAL\"", text):
            raw_eval.append(f"{path.relative_to(REPO)}: {m.group(0)}")
    assert registered == set(SCRIPTS), registered ^ set(SCRIPTS)
    assert raw_eval == []
    lua_files = sorted(str(p.relative_to(REPO)) for p in REPO.glob("producer_sdk/**/*.lua"))
    lua_files += sorted(str(p.relative_to(REPO)) for p in REPO.glob("worker/**/*.lua"))
    assert lua_files == ["producer_sdk/enqueue.lua"]


def test_every_lua_script_runs_on_a_cluster_with_its_keys_in_one_slot(cclient: redis.Redis) -> None:
    keys = Keys("lmx")
    model, rid = "ma", "req-1"
    calls: dict[str, tuple[list[str], list[Any]]] = {}
    cclient.hset(keys.limits(model), mapping={"max_backlog": 10})
    for stream in keys.req_streams(model):
        cclient.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)

    def run(name: str, script_keys: list[str], args: list[Any]) -> Any:
        calls[name] = (script_keys, args)
        assert len({key_slot(k.encode()) for k in script_keys}) == 1, (name, script_keys)
        script = cclient.register_script(SCRIPTS[name])
        return script(keys=script_keys, args=args)

    payload = b'{"request_id": "req-1"}'
    status, entry_id = run("enqueue_script_source()", enqueue_keys(keys, model), enqueue_args(rid, payload, 0))
    assert status == b"ok"
    assert run("_PICK_SCRIPT", keys.req_streams(model), [CONSUMER_GROUP, 5000]) == 2  # the normal band
    band, got_id, _fields = run("_PICK_SCRIPT", keys.req_streams(model), [CONSUMER_GROUP, 5000, "c1"])
    assert (band, got_id) == (2, entry_id)  # picked and read for consumer c1
    assert run("_RENEW_SCRIPT", [keys.req(model)], [CONSUMER_GROUP, "c1", entry_id]) == [entry_id]
    cclient.xgroup_createconsumer(keys.req(model), CONSUMER_GROUP, "c2")
    assert run("_PRUNE_SCRIPT", [keys.req(model)], [CONSUMER_GROUP, 0, "c1"]) == [b"c2"]
    owner = publisher_mod.owner_key(keys, rid)
    assert run("_FENCE_SCRIPT", [owner], ["tok", 60]) == 1
    event = encode_event(StartedEvent(request_id=rid, worker="c1", attempt=1, prompt_tokens=1))
    assert run("_APPEND_SCRIPT", [keys.events(rid), owner], [60, "tok", event]) == 1
    assert run("_APPEND_SCRIPT", [keys.events(rid), owner], [60, "other", event]) == -2  # fenced
    token = encode_event(TokenEvent(request_id=rid, index=0, token_ids=[5, 6], text="ab"))
    assert run("_APPEND_MANY_SCRIPT", [keys.events(rid), owner], [60, "tok", 1, 1, token]) == [1]  # expected length 1
    assert run("_ACK_SCRIPT", [keys.req(model), keys.ids(model), keys.dlq(model)],
               [CONSUMER_GROUP, entry_id, rid, "", 0, b""]) == 1
    assert cclient.hlen(keys.ids(model)) == 0 and cclient.xlen(keys.req(model)) == 0
    assert set(calls) == set(SCRIPTS)
    # The check can fail: keys of two slots are refused.
    with pytest.raises(RedisClusterException):
        cclient.register_script(SCRIPTS["_FENCE_SCRIPT"])(keys=[owner, keys.limits(model)], args=["t", 1])


# -- end to end on the cluster ---------------------------------------------------------------------------


def cluster_fleet(cluster: RedisClusterLauncher, root: Path, models: dict[str, Path], prefix: str,
                  **settings: Any) -> Fleet:
    return Fleet(root, cluster.url, prefix, models, {
        "redis_mode": "cluster", "redis_urls": cluster.urls[1:], "stats_interval_s": 0.25, "cancel_poll_ms": 50,
        **settings})


def specs_for(models: list[str], n_each: int, tag: str, max_tokens: int, *, seed: int = 7) -> list[RequestSpec]:
    out = []
    for i in range(n_each):
        for j, m in enumerate(models):
            out.append(RequestSpec(
                request_id=f"{tag}-{m}-{i}", model=m, prompt_ids=tuple(3 + (k * 7 + i + j) % 400 for k in range(6)),
                max_tokens=max_tokens, temperature=0.0 if i % 2 == 0 else 0.8, top_k=0, top_p=1.0,
                seed=seed + i, ignore_eos=True))
    return out


def read_all(url: str, urls: list[str], prefix: str, specs: list[RequestSpec]) -> dict[str, Any]:
    """Submit every spec through the cluster SDK, read each one's events concurrently; what each saw."""

    async def one(producer: AsyncProducer, s: RequestSpec) -> tuple[str, Any]:
        h = await producer.submit(s.model, **s.submit_kwargs())
        events = [e async for e in h.events()]
        return s.request_id, (events, h.resubmits)

    async def main() -> dict[str, Any]:
        async with AsyncProducer(url, prefix=prefix, redis_mode="cluster", redis_urls=urls) as producer:
            return dict(await asyncio.gather(*(one(producer, s) for s in specs)))

    return asyncio.run(main())


@pytest.mark.slow
def test_cluster_end_to_end_exactly_once_resume_cancel_priorities_admission(
        cluster: RedisClusterLauncher, cclient: redis.Redis, models: dict[str, Path], tmp_path: Path) -> None:
    prefix = "ce2e"
    keys = Keys(prefix)
    names = sorted(models)
    fleet = cluster_fleet(cluster, tmp_path, models, prefix, lease_idle_ms=1500)
    try:
        # Admission on the cluster: unknown model, then a full queue (limits written as a worker would).
        with Producer(cluster.url, prefix=prefix, redis_mode="cluster") as producer:
            with pytest.raises(UnknownModelError):
                producer.submit("nobody", prompt_ids=[5], max_tokens=4)
            cclient.hset(keys.limits("gated"), mapping={"max_backlog": 2})
            producer.submit("gated", prompt_ids=[5], max_tokens=4, request_id="g1")
            producer.submit("gated", prompt_ids=[5], max_tokens=4, request_id="g2", priority=3)
            assert producer.submit("gated", prompt_ids=[5], max_tokens=4, request_id="g1").duplicate
            with pytest.raises(QueueFullError) as full:
                producer.submit("gated", prompt_ids=[5], max_tokens=4, request_id="g3", priority=-1)
            assert (full.value.details["depth"], full.value.details["limit"]) == (2, 2)

        # Priorities: queued before any worker runs (limits written by hand), then served by one
        # worker that runs one request of the model at a time: high band first, low band last.
        for m in names:
            cclient.hset(keys.limits(m), mapping={"max_backlog": 1000})
        with Producer(cluster.url, prefix=prefix, redis_mode="cluster") as producer:
            order = [("low", -1), ("normal", 0), ("high", 2)]
            for band, prio in order:
                for i in range(2):
                    producer.submit("ma", prompt_ids=[7, 8, 9], max_tokens=24, priority=prio,
                                    request_id=f"prio-{band}-{i}")
        w1 = fleet.start("w1", model_extra={"max_running": 1})
        w1.wait_ready(cclient)
        started: list[tuple[int, int, str]] = []
        for band, _ in order:
            for i in range(2):
                rid = f"prio-{band}-{i}"
                wait_until(lambda rid=rid: stream_view(raw_events(cclient, keys, rid)).n_terminal == 1, WAIT_S,
                           f"{rid} to finish")
                first_id = cclient.xrange(keys.events(rid), count=1)[0][0].decode()
                ms, seq = first_id.split("-")
                started.append((int(ms), int(seq), band))
        assert [b for _, _, b in sorted(started)] == ["high", "high", "normal", "normal", "low", "low"]

        # Exactly once and equal to the engine's own output, three models at once.
        specs = specs_for(names, 4, "once", 24)
        seen = read_all(cluster.url, cluster.urls[1:], prefix, specs)
        reference = reference_output(models, specs)
        for s in specs:
            events, resubmits = seen[s.request_id]
            view = stream_view(events)
            assert (view.n_terminal, view.repeated, view.gaps, resubmits) == (1, 0, 0, 0), s.request_id
            assert isinstance(view.terminal, DoneEvent)
            assert (view.token_ids, view.text) == reference[s.request_id], s.request_id

        # Cancel a long request after its first token.
        async def cancel_one() -> CancelledEvent:
            async with AsyncProducer(cluster.url, prefix=prefix, redis_mode="cluster") as producer:
                h = await producer.submit("mb", prompt_ids=[11, 12], max_tokens=1000, ignore_eos=True)
                async for ev in h.events():
                    if isinstance(ev, TokenEvent):
                        await h.cancel()
                    elif isinstance(ev, CancelledEvent):
                        return ev
                raise AssertionError("no cancelled event")
        cancelled = asyncio.run(cancel_one())
        assert 0 < cancelled.completion_tokens < 1000

        # Resume: the worker is killed mid-generation; another one takes the requests over and
        # the SDK sees every token index once, with the undisturbed run's tokens.
        resume_specs = specs_for(["ma", "mc"], 2, "resume", 400)
        with Producer(cluster.url, prefix=prefix, redis_mode="cluster") as producer:
            for s in resume_specs:
                producer.submit(s.model, **s.submit_kwargs())

            def generating() -> bool:
                return sum(len(stream_view(raw_events(cclient, keys, s.request_id)).token_ids) > 0
                           for s in resume_specs) >= 2
            wait_until(generating, WAIT_S, "two requests to be generating")
            w1.kill()
            fleet.start("w2").wait_ready(cclient)
            reference = reference_output(models, resume_specs)
            takeovers = 0
            for s in resume_specs:
                h = producer.attach(s.model, s.request_id)
                view = stream_view(list(h.events()))
                assert (view.n_terminal, view.repeated, view.gaps) == (1, 0, 0), s.request_id
                assert (view.token_ids, view.text) == reference[s.request_id], s.request_id
                takeovers += stream_view(raw_events(cclient, keys, s.request_id)).attempts - 1
            assert takeovers >= 2
        for m in names:
            wait_until(lambda m=m: sum(cclient.xlen(k) for k in keys.req_streams(m)) == 0, WAIT_S,
                       f"the request streams of {m} to empty")
            assert cclient.hlen(keys.ids(m)) == 0
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.close()


@pytest.mark.slow
def test_an_entry_lost_in_a_failover_is_resubmitted_by_its_handle_and_an_attached_handle_raises(
        cluster: RedisClusterLauncher, cclient: redis.Redis, models: dict[str, Path], tmp_path: Path) -> None:
    """What a failover that lost a just-acknowledged enqueue leaves behind: no entry, no ids field,
    no reply stream. Nothing hangs: the submit() handle enqueues the same message again (same
    request id) and gets the undisturbed tokens; a handle from attach() has no message and raises."""
    prefix = "lost"
    keys = Keys(prefix)
    spec = specs_for(["ma"], 1, "lost", 16)[0]
    cclient.hset(keys.limits("ma"), mapping={"max_backlog": 100})  # accepted before any worker runs
    fleet = cluster_fleet(cluster, tmp_path, models, prefix)
    try:
        with Producer(cluster.url, prefix=prefix, redis_mode="cluster") as producer:
            handle = producer.submit("ma", **spec.submit_kwargs())
            assert handle.entry_id is not None
            cclient.xdel(keys.req("ma"), handle.entry_id)
            cclient.hdel(keys.ids("ma"), spec.request_id)
            with pytest.raises(WorkerFailureError) as lost:
                producer.attach("ma", spec.request_id).result(timeout=WAIT_S)
            assert lost.value.code == "request_lost"
            fleet.start("w1").wait_ready(cclient)
            result = handle.result(timeout=WAIT_S)
            assert handle.resubmits == 1
            assert (result.token_ids, result.text) == reference_output(models, [spec])[spec.request_id]
            view = stream_view(raw_events(cclient, keys, spec.request_id))
            assert (view.n_terminal, view.repeated, view.attempts) == (1, 0, 1)
        # The command line in cluster mode (flags, and the worker's environment variables).
        base = [sys.executable, "-m", "worker.cli"]
        flags = ["--redis-url", cluster.url, "--redis-mode", "cluster", "--prefix", prefix]
        out = subprocess.run([*base, "submit", "ma", "hello", "--max-tokens", "4", "--json", *flags],
                             cwd=REPO, capture_output=True, timeout=WAIT_S, check=False)
        assert out.returncode == 0, out.stderr.decode()
        assert orjson.loads(out.stdout)["usage"]["completion_tokens"] <= 4
        env = {**os.environ, "LAYERMUX_REDIS_MODE": "cluster", "LAYERMUX_REDIS_URLS": orjson.dumps(cluster.urls[1:])}
        out = subprocess.run([*base, "status", "--json", "--redis-url", cluster.url, "--prefix", prefix], cwd=REPO,
                             capture_output=True, timeout=WAIT_S, env=env, check=False)
        assert out.returncode == 0, out.stderr.decode()
        assert "ma" in orjson.loads(out.stdout)["models"]
        bad = subprocess.run([*base, "status", "--redis-url", cluster.url, "--redis-mode", "sentinel"], cwd=REPO,
                             capture_output=True, timeout=WAIT_S, check=False)
        assert bad.returncode == 2 and b"sentinel_master" in bad.stderr and b"Traceback" not in bad.stderr
        # The liveness probe (deploy/k8s/worker.yaml) reads the heartbeat key on whichever node serves
        # it: a worker with none is dead even when its key's slot is not on the seed node (a standalone
        # client got MOVED there, took it for an unreachable Redis and said alive).
        seed = int(cluster.url.rsplit(":", 1)[1])
        gone = next(w for w in (f"gone{i}" for i in range(100))
                    if cluster.node_of_slot(key_slot(keys.heartbeat(w).encode())).port != seed)
        for worker_id, expected in (("w1", 0), (gone, 1)):
            probe = subprocess.run([*base, "status", "--alive", worker_id, *flags], cwd=REPO, capture_output=True,
                                   timeout=WAIT_S, check=False)
            assert probe.returncode == expected, (worker_id, probe.stderr.decode())
            assert b"Traceback" not in probe.stderr
        down = subprocess.run([*base, "status", "--alive", "w1", "--redis-url", f"redis://127.0.0.1:{_closed_port()}",
                               "--redis-mode", "cluster"], cwd=REPO, capture_output=True, timeout=WAIT_S, check=False)
        assert down.returncode == 0 and b"cannot reach Redis" in down.stderr, down.stderr.decode()
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.close()


def test_the_liveness_probe_follows_sentinel_to_the_master(tmp_path: Path) -> None:
    """`layermux status --alive` in sentinel mode asks the Sentinels for the master and reads the
    heartbeat key there (a standalone client sent EXISTS to a Sentinel, took the refusal for an
    unreachable Redis and said alive, for any worker id)."""
    keys = Keys("probe")
    with SentinelLauncher(tmp_path / "sentinel") as sentinels:
        urls = sentinels.urls
        master = make_sync_client(urls[0], mode="sentinel", urls=urls[1:], sentinel_master=sentinels.name)
        try:
            master.set(keys.heartbeat("w1"), b"1", ex=600)  # what a live worker's heartbeat task keeps
        finally:
            master.close()
        flags = ["--redis-url", urls[0], "--redis-urls", ",".join(urls[1:]), "--redis-mode", "sentinel",
                 "--sentinel-master", sentinels.name, "--prefix", "probe"]
        for worker_id, expected in (("w1", 0), ("w2", 1)):
            probe = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--alive", worker_id, *flags],
                                   cwd=REPO, capture_output=True, timeout=WAIT_S, check=False)
            assert probe.returncode == expected, (worker_id, probe.stderr.decode())
            assert b"Traceback" not in probe.stderr


# -- what a failover's lost writes leave: the worker's and the reader's side -------------------------------


def test_a_run_whose_written_events_were_lost_is_stopped_without_a_terminal(redis_url: str) -> None:
    """The reply stream is shorter than what the run wrote (a promoted replica lacked its last
    events): the run's next append writes nothing, the run is stopped (on_fenced) and not acked,
    so its entry's lease lapses and the request resumes from what the stream still holds."""
    from worker.publisher import Publisher

    keys = Keys("lw")

    async def main() -> tuple[list[str], list[Any]]:
        client = make_async_client(redis_url)
        pub = Publisher(client, keys, 60)
        stopped: list[str] = []
        pub.on_fenced = stopped.append
        task = asyncio.create_task(pub.run())
        try:
            pub.set_fence("r1", "W#1", 0)
            pub.publish(StartedEvent(request_id="r1", worker="W", attempt=1, prompt_tokens=2))
            pub.publish_tokens("r1", 0, [5, 6], "ab")
            assert await pub.flush(30)
            last = await client.xrevrange(keys.events("r1"), count=1)
            await client.xdel(keys.events("r1"), last[0][0])  # the failover lost the token event
            pub.publish_tokens("r1", 2, [7], "c")
            assert await pub.flush(30)
            events = await client.xrange(keys.events("r1"))
            return stopped, events
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    stopped, events = asyncio.run(main())
    assert stopped == ["r1"]
    assert len(events) == 1  # only the started event: index 2 was not written over the hole


def test_a_run_that_finished_while_its_lost_write_round_was_in_flight_gives_its_entry_back(redis_url: str) -> None:
    """Issue 17's hang. The run finished (its terminal event and its entry's ack queued) while the
    writer was retrying a round through the failover; that round then finds the stream shorter than
    the run wrote (-3) and the run's queued events are dropped with it. The ack they carried must be
    given back (on_acked: the consumer stops renewing the entry's lease), or the entry stays pending
    to a worker whose run no longer exists, renewed forever, and no worker ever takes it over."""
    from worker.publisher import AckEntry, Publisher

    keys = Keys("lw")
    ack = AckEntry("m", "1-0", "r2")

    async def main() -> tuple[list[str], list[AckEntry], int]:
        client = make_async_client(redis_url)
        pub = Publisher(client, keys, 60)
        stopped: list[str] = []
        released: list[AckEntry] = []
        pub.on_fenced = stopped.append
        pub.on_acked = released.append
        try:  # the writer's steps one at a time (no run() task), so the round is in flight when the run ends
            pub.set_fence("r2", "W#1", 0)
            pub.publish(StartedEvent(request_id="r2", worker="W", attempt=1, prompt_tokens=2))
            pub.publish_tokens("r2", 0, [5, 6], "ab")
            await pub._write_events(pub._take_rounds())
            last = await client.xrevrange(keys.events("r2"), count=1)
            await client.xdel(keys.events("r2"), last[0][0])  # the failover lost the token event
            pub.publish_tokens("r2", 2, [7], "c")
            in_flight = pub._take_rounds()
            pub.publish_tokens("r2", 3, [8], "d")  # meanwhile the run ends
            pub.publish(DoneEvent(request_id="r2", finish_reason="length", text="abcd", token_ids=[5, 6, 7, 8],
                                  usage=USAGE), ack=ack)
            await pub._write_events(in_flight)
            return stopped, released, pub.pending_requests()
        finally:
            await client.aclose()

    stopped, released, pending = asyncio.run(main())
    assert stopped == ["r2"]
    assert released == [ack]  # the entry is given back: its lease lapses and another run resumes it
    assert pending == 0  # nothing of the stopped run is left to write


def test_a_stopped_runs_queued_terminal_does_not_drop_the_next_runs_events(redis_url: str) -> None:
    """A run of this worker finished (terminal queued) but the request was taken over, by this same
    worker again, before the writer took the queue: the old run's terminal is refused (-2, the new run
    holds the fence) and the new run's events that follow it in the queue are written, not dropped."""
    from worker.publisher import AckEntry, Publisher

    keys = Keys("lw")
    old_ack, new_ack = AckEntry("m", "1-0", "r3"), AckEntry("m", "2-0", "r3")

    async def main() -> tuple[list[str], list[AckEntry], list[Any]]:
        client = make_async_client(redis_url)
        pub = Publisher(client, keys, 60)
        stopped: list[str] = []
        released: list[AckEntry] = []
        pub.on_fenced = stopped.append
        pub.on_acked = released.append
        try:
            await pub.take_fence("r3", "W#1")
            pub.set_fence("r3", "W#1", 0)
            pub.publish(StartedEvent(request_id="r3", worker="W", attempt=1, prompt_tokens=2))
            pub.publish_tokens("r3", 0, [5, 6], "ab")
            await pub._write_events(pub._take_rounds())
            pub.publish_tokens("r3", 2, [7], "c")
            pub.publish(DoneEvent(request_id="r3", finish_reason="length", text="abc", token_ids=[5, 6, 7],
                                  usage=USAGE), ack=old_ack)
            await pub.take_fence("r3", "W#2")  # the new run (a resubmitted entry) resumes at token 2
            pub.set_fence("r3", "W#2", 2)
            pub.publish(StartedEvent(request_id="r3", worker="W", attempt=2, prompt_tokens=2))
            pub.publish_tokens("r3", 2, [7], "c")
            pub.publish(DoneEvent(request_id="r3", finish_reason="length", text="abc", token_ids=[5, 6, 7],
                                  usage=USAGE), ack=new_ack)
            await pub._write_events(pub._take_rounds())
            events = [decode_event(f[b"data"]) for _, f in await client.xrange(keys.events("r3"))]
            return stopped, released, events
        finally:
            await client.aclose()

    stopped, released, events = asyncio.run(main())
    assert stopped == []  # the run publishing now is not the refused one
    assert released == [old_ack]  # given back by the refusal; the new run's ack is written by _write_acks
    assert [(type(e).__name__, getattr(e, "index", None)) for e in events] == [
        ("StartedEvent", None), ("TokenEvent", 0), ("StartedEvent", None), ("TokenEvent", 2), ("DoneEvent", None)]


def test_a_reader_ahead_of_a_resumed_run_gets_only_the_new_tokens_and_text() -> None:
    """A reader that had read tokens 0..4 when the stream lost the event of 2..4: the resumed run
    publishes 2..6 in one event; the reader gets 5..6 with their text, and a gap still raises."""
    from producer_sdk.errors import ProtocolError
    from producer_sdk.reply import ReplyCursor

    def entry(ev: Any) -> dict[bytes, bytes]:
        return {b"data": encode_event(ev)}

    cur = ReplyCursor("r")
    assert cur.accept("1-0", entry(TokenEvent(request_id="r", index=0, token_ids=[1, 2], text="ab")))
    assert cur.accept("1-1", entry(TokenEvent(request_id="r", index=2, token_ids=[3, 4, 5], text="cde")))
    got = cur.accept("2-0", entry(TokenEvent(request_id="r", index=2, token_ids=[3, 4, 5, 6, 7], text="cdefg")))
    assert isinstance(got, TokenEvent) and (got.index, got.token_ids, got.text) == (5, [6, 7], "fg")
    assert cur.accept("2-1", entry(TokenEvent(request_id="r", index=0, token_ids=[1], text="a"))) is None
    with pytest.raises(ProtocolError):  # starts inside an event this reader never saw the start of
        cur.accept("2-2", entry(TokenEvent(request_id="r", index=6, token_ids=[7, 8], text="gh")))


def test_a_reader_ahead_of_a_resumed_run_that_coalesced_differently_gets_only_the_new_tokens() -> None:
    """The failover lost the reader's whole stream (started, tokens 0..6 in one event); the run that
    takes over writes tokens 0..1, then 2..12: the first is dropped, and where it ended is where the
    second may be cut, so the reader gets 7..12 with their text (issue 17: a ProtocolError before)."""
    from producer_sdk.reply import ReplyCursor

    def entry(ev: Any) -> dict[bytes, bytes]:
        return {b"data": encode_event(ev)}

    cur = ReplyCursor("r")
    assert cur.accept("1-0", entry(TokenEvent(request_id="r", index=0, token_ids=list(range(7)), text="abcdefg")))
    assert cur.accept("2-0", entry(TokenEvent(request_id="r", index=0, token_ids=[0, 1], text="ab"))) is None
    got = cur.accept("2-1", entry(TokenEvent(request_id="r", index=2, token_ids=list(range(2, 13)),
                                             text="cdefghijklm")))
    assert isinstance(got, TokenEvent) and (got.index, got.token_ids, got.text) == (7, list(range(7, 13)), "hijklm")
    assert cur.next_index == 13
