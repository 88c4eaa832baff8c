"""Owns: a real Redis Cluster (3 masters, 3 replicas) and a real Sentinel set-up on free loopback
ports, from the same redis-server binary the project brings (tools.embedded_redis).
Owned by the tests; nothing is mocked. Used by tests/test_cluster*.py.
Not thread-safe: one test (or fixture) drives a launcher from one thread.

    with RedisClusterLauncher(tmp_path) as cluster:   # 6 nodes, slots assigned, replicas attached
        client = redis.RedisCluster.from_url(cluster.url)
        cluster.kill_master_of(b"lmx:{m:ma}:req")     # SIGKILL; its replica is promoted

The cluster is built with plain commands (CLUSTER MEET / ADDSLOTS / REPLICATE), so no
redis-cli is needed. cluster-node-timeout is small (NODE_TIMEOUT_MS) so that a killed master's
replica takes over within a couple of seconds.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import redis
from redis.cluster import key_slot

from tools.embedded_redis import EmbeddedRedis, find_redis_server

__all__ = ["NODE_TIMEOUT_MS", "RedisClusterLauncher", "SentinelLauncher", "wait_for"]

NODE_TIMEOUT_MS: Final = 1000
N_SLOTS: Final = 16384
SETUP_TIMEOUT_S: Final = 60.0  # bounds waits only
HOST: Final = "127.0.0.1"


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy (returned); AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except (redis.RedisError, OSError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=5.0, socket_connect_timeout=2.0)


class RedisClusterLauncher:
    """`masters` masters with `replicas_per_master` replicas each, every node an EmbeddedRedis."""

    def __init__(self, root: Path, masters: int = 3, replicas_per_master: int = 1,
                 node_timeout_ms: int = NODE_TIMEOUT_MS, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = extra_args
        self.nodes: list[EmbeddedRedis] = []

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        """Every node's URL (seed list for redis_urls)."""
        return [f"redis://{HOST}:{n.port}" for n in self.nodes]

    @property
    def url(self) -> str:
        """One seed node's URL."""
        return self.urls[0]

    def start(self) -> None:
        n = self.n_masters * (1 + self.replicas_per_master)
        for i in range(n):
            d = self.root / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            node = EmbeddedRedis(port=_free_cluster_port(), directory=d, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica whose link broke during the test still takes over (no data-age veto).
                "--cluster-replica-validity-factor", "0",
                "--cluster-require-full-coverage", "no",
                "--save", "", *self.extra_args))
            node.start()
            self.nodes.append(node)
        ports = [nd.port for nd in self.nodes]
        first = _client(ports[0])
        try:
            for p in ports[1:]:
                first.execute_command("CLUSTER", "MEET", HOST, p)
        finally:
            first.close()
        per = N_SLOTS // self.n_masters
        for m in range(self.n_masters):
            lo = m * per
            hi = N_SLOTS - 1 if m == self.n_masters - 1 else (m + 1) * per - 1
            c = _client(ports[m])
            try:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            except redis.ResponseError:  # Redis < 7: no ADDSLOTSRANGE
                c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
            finally:
                c.close()
        ids = [self._node_id(p) for p in ports[: self.n_masters]]
        wait_for(lambda: all(self._knows(p, ids) for p in ports), SETUP_TIMEOUT_S, "every node to know the masters")
        for r in range(self.n_masters * self.replicas_per_master):
            port = ports[self.n_masters + r]
            c = _client(port)
            try:
                c.execute_command("CLUSTER", "REPLICATE", ids[r % self.n_masters])
            finally:
                c.close()
        self.wait_healthy()

    def _node_id(self, port: int) -> str:
        c = _client(port)
        try:
            return str(c.execute_command("CLUSTER", "MYID").decode())
        finally:
            c.close()

    def _knows(self, port: int, ids: list[str]) -> bool:
        c = _client(port)
        try:
            text = c.execute_command("CLUSTER", "NODES").decode()
        finally:
            c.close()
        return all(i in text for i in ids)

    def _info(self, port: int) -> dict[str, str]:
        c = _client(port)
        try:
            text = c.execute_command("CLUSTER", "INFO").decode()
        finally:
            c.close()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def masters(self) -> dict[int, tuple[int, int]]:
        """port -> (first slot, last slot) of each live master, as a live node sees it."""
        out: dict[int, tuple[int, int]] = {}
        for node in self.nodes:
            if not node.running:
                continue
            c = _client(node.port)
            try:
                for lo, hi, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    out[int(master[1])] = (int(lo), int(hi))
            finally:
                c.close()
            return out
        return out

    def wait_healthy(self, timeout_s: float = SETUP_TIMEOUT_S) -> None:
        """Until every live node reports cluster_state ok, all slots served, and every master of a
        live node has a live, in-sync replica link (when replicas were asked for)."""
        def healthy() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                info = self._info(node.port)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(N_SLOTS):
                    return False
            if self.replicas_per_master:
                for port in self.masters():
                    c = _client(port)
                    try:
                        rep = c.info("replication")
                    finally:
                        c.close()
                    if int(rep.get("connected_slaves", 0)) < 1:
                        return False
            return True
        wait_for(healthy, timeout_s, "the cluster to be healthy")

    def node_of_slot(self, slot: int) -> EmbeddedRedis:
        for port, (lo, hi) in self.masters().items():
            if lo <= slot <= hi:
                return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no master serves slot {slot}")

    def kill_master_of(self, key: str | bytes) -> EmbeddedRedis:
        """SIGKILL the master serving `key`'s slot (no shutdown, no save); returns that node."""
        node = self.node_of_slot(key_slot(key.encode() if isinstance(key, str) else key))
        node.kill()
        return node

    def wait_promoted(self, key: str | bytes, old_port: int, timeout_s: float = SETUP_TIMEOUT_S) -> int:
        """Until another node serves `key`'s slot with the cluster ok; returns its port."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)

        def promoted() -> int | None:
            for port, (lo, hi) in self.masters().items():
                if lo <= slot <= hi and port != old_port:
                    for node in self.nodes:
                        if node.running and self._info(node.port).get("cluster_state") != "ok":
                            return None
                    return port
            return None
        return int(wait_for(promoted, timeout_s, f"a replica to take over slot {slot}"))

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):  # best effort: the others still close
                node.close()


class SentinelLauncher:
    """One master, one replica and three Sentinels watching them as master set `name`."""

    def __init__(self, root: Path, name: str = "lmxmaster", down_after_ms: int = 1000) -> None:
        self.root = root
        self.name = name
        self.down_after_ms = down_after_ms
        self.data: list[EmbeddedRedis] = []
        self.sentinels: list[tuple[subprocess.Popen[bytes], int]] = []

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        """The Sentinels' URLs (redis_url + redis_urls in sentinel mode)."""
        return [f"redis://{HOST}:{port}" for _, port in self.sentinels]

    def master_port(self) -> int:
        for _, port in self.sentinels:
            c = _client(port)
            try:
                addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
                if addr:
                    return int(addr[1])
            except redis.RedisError:
                continue
            finally:
                c.close()
        raise AssertionError("no Sentinel answers")

    def start(self) -> None:
        master = EmbeddedRedis(directory=self._dir("master"), extra_args=("--save", "")).start()
        self.data.append(master)
        replica = EmbeddedRedis(directory=self._dir("replica"), extra_args=(
            "--save", "", "--replicaof", HOST, str(master.port))).start()
        self.data.append(replica)
        binary = find_redis_server()
        for i in range(3):
            d = self._dir(f"sentinel{i}")
            port = _free_port()
            conf = d / "sentinel.conf"
            conf.write_text("\n".join([
                f"port {port}", f"bind {HOST}", "daemonize no", f"dir {d}",
                f"sentinel monitor {self.name} {HOST} {master.port} 2",
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.name} 10000",
                f"sentinel parallel-syncs {self.name} 1", ""]))
            log = open(d / "sentinel.log", "wb")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=d)
            log.close()
            self.sentinels.append((proc, port))
        wait_for(lambda: all(_ping(p) for _, p in self.sentinels), SETUP_TIMEOUT_S, "the Sentinels to answer")

        def replica_synced() -> bool:
            c = _client(master.port)
            try:
                return int(c.info("replication").get("connected_slaves", 0)) >= 1
            finally:
                c.close()
        wait_for(replica_synced, SETUP_TIMEOUT_S, "the replica to sync")
        wait_for(lambda: all(self._sentinel_sees_replica(p) for _, p in self.sentinels), SETUP_TIMEOUT_S,
                 "every Sentinel to see the replica and the other Sentinels")

    def _sentinel_sees_replica(self, port: int) -> bool:
        c = _client(port)
        try:
            replicas = c.execute_command("SENTINEL", "REPLICAS", self.name)
            master = c.execute_command("SENTINEL", "MASTER", self.name)
        finally:
            c.close()
        fields = dict(zip(master[::2], master[1::2]))
        return bool(replicas) and int(fields.get(b"num-other-sentinels", 0)) >= 2

    def _dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def kill_master(self) -> EmbeddedRedis:
        port = self.master_port()
        node = next(n for n in self.data if n.port == port)
        node.kill()
        return node

    def close(self) -> None:
        for proc, _ in self.sentinels:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for node in self.data:
            with contextlib.suppress(Exception):  # best effort
                node.close()


def _ping(port: int) -> bool:
    c = _client(port)
    try:
        return bool(c.ping())
    finally:
        c.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too (Redis Cluster's rule)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise AssertionError("no free port pair (P, P + 10000) found on 127.0.0.1")
