"""Owns: `layermux serve` — settings, the listening socket, and running the gateway app under uvicorn.
Changed by: the gateway; worker/cli.py only parses the arguments and calls `serve()`.
Thread-safety: one call per process (uvicorn owns the event loop and the signals).

The socket is bound here rather than by uvicorn so that `--port 0` works: the line
`layermux serve: listening on http://HOST:PORT` (stderr) names the port actually bound, and is
written once the app has started. SIGTERM/SIGINT stop accepting connections and give open
streams `drain_timeout_s` to finish; a stream cut then still runs to its terminal event in
the queue.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import cast

import uvicorn

from ..settings import ConfigError, Settings, load_settings
from .app import create_app, load_api_keys

__all__ = ["gateway_settings", "serve"]

log = logging.getLogger("layermux.gateway")


def gateway_settings(config: str | None, host: str | None, port: int | None) -> Settings:
    """Settings for the gateway: the worker's TOML ([gateway] table) and LAYERMUX_… variables, then the
    command line's host/port. Raises ConfigError (redis_url is required: a gateway has no embedded Redis)."""
    settings = load_settings(config)
    updates = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if updates:
        settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update=updates)})
    if settings.redis_url is None:
        raise ConfigError("redis_url: not set; the gateway needs the Redis the workers use "
                          "(redis_url in the config file or LAYERMUX_REDIS_URL)")
    return settings


def serve(settings: Settings) -> None:
    """Run the gateway until SIGINT/SIGTERM. Raises ConfigError for an unreadable api_keys_file and
    OSError when the address cannot be bound."""
    g = settings.gateway
    try:
        api_keys = load_api_keys(g)
    except OSError as e:
        raise ConfigError(f"gateway.api_keys_file: cannot read {g.api_keys_file} ({e.strerror or e})") from e
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    family = socket.AF_INET6 if ":" in g.host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the proto says TCP,
    # and without it Nagle holds the first SSE chunk behind the headers until the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((g.host, g.port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    app = create_app(settings, api_keys)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            sys.stderr.write(f"layermux serve: listening on http://{shown}:{port} "
                             f"(key prefix {settings.key_prefix!r}, API keys {'on' if api_keys else 'off'})\n")
            sys.stderr.flush()
        await task

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    finally:
        sock.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (it relays streams with less CPU), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
