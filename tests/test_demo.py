"""`layermux demo` end to end: a fresh HOME, real Redis, a real worker and producer processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = ("smol-tiny", "qwen-tiny", "llama-tiny")


def run_demo(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_") and k != "XDG_CACHE_HOME"}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
        check=False,
    )


def summary_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("MODEL") and "TOKENS/S" in line)
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def assert_gone(stdout: str) -> None:
    """The worker and Redis the demo started are no longer running."""
    pid = int(re.search(r"worker pid (\d+)", stdout).group(1))  # type: ignore[union-attr]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"worker pid {pid} still running after the demo")
    port = int(re.search(r"redis redis://127\.0\.0\.1:(\d+)/", stdout).group(1))  # type: ignore[union-attr]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"redis still listening on {port}"


def test_demo_from_a_fresh_home_streams_all_three_models(tmp_path: Path) -> None:
    proc = run_demo(tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for name in DEMO_MODELS:
        assert (tmp_path / ".cache" / "layermux" / "demo-models" / name / "config.json").is_file()
        assert f"{name}: created" in proc.stdout
    rows = summary_rows(proc.stdout)
    assert sorted(rows) == sorted(DEMO_MODELS)
    for name, cells in rows.items():
        # MODEL RESIDENCY REQUESTS TOKENS TOKENS/S TTFT p50 ERRORS
        assert cells[2] == "4", cells
        assert int(cells[3]) > 0, cells
        assert float(cells[4]) > 0, cells
        assert cells[-1] == "0", cells
    assert {rows[n][1] for n in DEMO_MODELS} == {"resident", "streamed"}
    assert "device: budget" in proc.stdout  # the worker's ledger, as published in lmx:workers
    assert "as the worker published it in lmx:workers" in proc.stdout
    assert "P:" not in proc.stdout  # real key names, not the docs' placeholder
    # The ledger shown is the one at its peak: requests running and KV booked, not an idle device.
    m = re.search(r"at its fullest during the run \((\d+) requests running, ([0-9.]+ \w+) of KV", proc.stdout)
    assert m is not None, proc.stdout
    assert int(m.group(1)) > 0 and m.group(2) != "0 B", m.group(0)
    table = proc.stdout[proc.stdout.index("at its fullest"):]
    rows = [line.split() for line in table.splitlines() if line.strip().split()[:1] and
            line.strip().split()[0] in DEMO_MODELS]
    assert any(int(r[-2]) > 0 for r in rows), table  # RUNNING column
    assert "streamed through" in proc.stdout and "so the device holds only part of them" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert_gone(proc.stdout)


def test_demo_reuses_cached_models_and_honours_its_options(tmp_path: Path) -> None:
    first = run_demo(tmp_path, "--requests-per-model", "1", "--max-tokens", "4")
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    second = run_demo(tmp_path, "--requests-per-model", "2", "--max-tokens", "4")
    assert second.returncode == 0, f"stdout:\n{second.stdout}\nstderr:\n{second.stderr}"
    for name in DEMO_MODELS:
        assert f"{name}: cached" in second.stdout
    rows = summary_rows(second.stdout)
    for cells in rows.values():
        assert cells[2] == "2", cells
        assert 0 < int(cells[3]) <= 2 * 4, cells
    assert_gone(second.stdout)


def test_demo_keep_prints_the_export_line_that_reaches_its_redis(tmp_path: Path) -> None:
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_") and k != "XDG_CACHE_HOME"}
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "demo", "--keep", "--requests-per-model", "1", "--max-tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - before exec only
    ) as proc:
        try:
            assert proc.stdout is not None
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if line.startswith("Press Ctrl-C"):
                    break
            export = next((s.split("=", 1)[1].strip() for s in seen if "export LAYERMUX_REDIS_URL=" in s), None)
            assert export is not None, "".join(seen)
            status = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--json"], capture_output=True,
                                    text=True, cwd=REPO, env={**env, "LAYERMUX_REDIS_URL": export}, timeout=60,
                                    check=False)
            assert status.returncode == 0, status.stderr
            assert sorted(json.loads(status.stdout)["models"]) == sorted(DEMO_MODELS)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
