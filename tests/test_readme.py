"""The README's Python examples run as written: each ```python block is saved as a script and run
in a fresh interpreter against a real redis-server and a real `layermux worker` process serving a
tiny model under the names the README uses (`smol`, key prefix `lmx`).

A block that is not meant to run has `<!-- not-run: reason -->` on the line right before its fence;
the SDK examples must not be marked so (checked below). The scripts get the server's URL in
LAYERMUX_REDIS_URL, as a reader who followed the README's set-up has it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from faultlib import Fleet, WorkerProc

from tools.model_factory import make_model

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
SCRIPT_TIMEOUT_S = 120.0  # bounds a hung example; nothing asserts on time


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number of the fence, code, not-run reason or None) of every ```python block."""
    lines = text.splitlines()
    blocks: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = lines[start - 1] if start > 0 else ""
            m = NOT_RUN.search(prev)
            blocks.append((start + 1, "\n".join(lines[start + 1 : j]) + "\n", m.group(1) if m else None))
            i = j + 1
        else:
            i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_sync_and_async_sdk_examples() -> None:
    runnable = [code for _, code, reason in BLOCKS if reason is None]
    assert any("Producer(" in c and "AsyncProducer" not in c for c in runnable), "no runnable sync example"
    assert any("AsyncProducer" in c and "asyncio.run(" in c for c in runnable), "no runnable async example"


@pytest.fixture(scope="module")
def readme_worker(tmp_path_factory: pytest.TempPathFactory, redis_server: object) -> Iterator[str]:
    """A worker serving `smol` under prefix `lmx` on the session's Redis; yields the URL."""
    from tools.embedded_redis import EmbeddedRedis

    assert isinstance(redis_server, EmbeddedRedis)
    root = tmp_path_factory.mktemp("readme")
    model = make_model(root / "smol", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128,
                       init_std=0.1, seed=3)
    url = redis_server.url
    client = redis.Redis.from_url(url)
    client.flushall()
    fleet = Fleet(root, url, "lmx", {"smol": model})
    try:
        proc: WorkerProc = fleet.start("readme-worker")
        proc.wait_ready(client)
        yield url
    finally:
        fleet.close()
        client.close()


@pytest.mark.parametrize(
    "line,code,reason", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS]
)
def test_readme_python_block_runs(line: int, code: str, reason: str | None, readme_worker: str,
                                  tmp_path: Path) -> None:
    if reason is not None:
        pytest.skip(f"README.md:{line} is marked not-run: {reason}")
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    env["LAYERMUX_REDIS_URL"] = readme_worker
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=SCRIPT_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr}"
    assert proc.stdout.strip(), f"README.md:{line} printed nothing"
