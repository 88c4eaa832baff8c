"""The `layermux` command line: argument errors, `generate`, `status` and `submit`.

Commands run as real processes (`python -m worker.cli ...`) wherever the exit code and
the absence of a traceback are the behaviour under test; Redis is the real server of the
suite's `redis_url` fixture.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from worker import cli, status

REPO = Path(__file__).resolve().parents[1]


def fresh_prefix(tag: str) -> str:
    """A key prefix no other test (or earlier run on the same server) has used."""
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def run_cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=full_env,
        check=False,
    )


# --------------------------------------------------------------------------- parsing


def test_parse_size_accepts_binary_and_decimal_units() -> None:
    assert cli.parse_size("4GiB") == 4 * 2**30
    assert cli.parse_size("512MiB") == 512 * 2**20
    assert cli.parse_size("2G") == 2 * 10**9
    assert cli.parse_size("1.5GB") == 1_500_000_000
    assert cli.parse_size("4096") == 4096


@pytest.mark.parametrize("text", ["", "GiB", "4 parsecs", "-1GiB", "0"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(Exception, match="size"):
        cli.parse_size(text)


def test_parse_token_ids_names_the_bad_element() -> None:
    assert cli.parse_token_ids("1, 2,3") == [1, 2, 3]
    with pytest.raises(Exception, match=r"element 1 \('x'\)"):
        cli.parse_token_ids("1,x")


def test_every_subcommand_has_help() -> None:
    for command in ("generate", "worker", "submit", "status", "redis", "demo"):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0


def test_generate_with_malformed_token_ids_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = run_cli("generate", str(tmp_path), "--prompt-ids", "1,x")
    assert proc.returncode == 2
    assert "element 1 ('x') is not a non-negative integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_with_missing_model_dir_exits_2_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = run_cli("generate", str(missing), "--prompt", "hi")
    assert proc.returncode == 2
    assert f"model not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_generate_needs_exactly_one_prompt_form(tmp_path: Path) -> None:
    proc = run_cli("generate", str(tmp_path), "--prompt", "hi", "--prompt-ids", "1,2")
    assert proc.returncode == 2
    assert "not allowed with argument" in proc.stderr
    proc = run_cli("generate", str(tmp_path))
    assert proc.returncode == 2
    assert "one of the arguments --prompt --prompt-ids is required" in proc.stderr


def test_bad_budget_and_temperature_exit_2(tmp_path: Path) -> None:
    proc = run_cli("generate", str(tmp_path), "--prompt", "hi", "--budget", "lots")
    assert proc.returncode == 2
    assert "invalid size" in proc.stderr and "'lots'" in proc.stderr
    proc = run_cli("generate", str(tmp_path), "--prompt", "hi", "--temperature", "-1")
    assert proc.returncode == 2
    assert "must be >= 0" in proc.stderr


def test_worker_with_missing_config_exits_2(tmp_path: Path) -> None:
    proc = run_cli("worker", "--config", str(tmp_path / "absent.toml"))
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- generate


def _worker_config(path: Path, model: Path, *, redis_url: str | None = "redis://127.0.0.1:1/0",
                   budget: str = "256MiB", prefix: str = "wk") -> Path:
    url = f'redis_url = "{redis_url}"\n' if redis_url is not None else ""
    path.write_text(f'{url}key_prefix = "{prefix}"\n[device]\nbudget = "{budget}"\n'
                    f'[[models]]\nname = "tiny"\npath = "{model}"\n')
    return path


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("layermux worker: error: "), proc.stderr
    return lines[0]


def test_worker_with_a_missing_model_dir_exits_2_before_touching_redis(tmp_path: Path) -> None:
    # redis_url points at a closed port: the model is checked first, so the message is about the model.
    cfg = _worker_config(tmp_path / "w.toml", tmp_path / "no-such-model")
    proc = run_cli("worker", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert f"path not found: {tmp_path / 'no-such-model'}" in _one_error_line(proc)


def test_worker_with_a_truncated_weights_file_exits_2_naming_the_file(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_cli("worker", "--config", str(_worker_config(tmp_path / "w.toml", model)))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert str(weights) in line and "truncated" in line


def test_worker_with_an_unsupported_architecture_exits_2(tiny_model: Path, tmp_path: Path) -> None:
    import json
    import shutil

    model = tmp_path / "unsupported"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("worker", "--config", str(_worker_config(tmp_path / "w.toml", model)))
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert "MambaForCausalLM" in line and "config.json" in line


def test_worker_with_unreachable_redis_exits_1_naming_the_url(tiny_model: Path, tmp_path: Path) -> None:
    proc = run_cli("worker", "--config", str(_worker_config(tmp_path / "w.toml", tiny_model)))
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc)
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in line
    assert "retrying" not in proc.stdout + proc.stderr


def test_worker_with_a_budget_too_small_exits_1_with_the_numbers(tiny_model: Path, tmp_path: Path,
                                                                redis_url: str) -> None:
    cfg = _worker_config(tmp_path / "w.toml", tiny_model, redis_url=redis_url, budget="64KiB",
                         prefix=fresh_prefix("small"))
    proc = run_cli("worker", "--config", str(cfg))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("layermux worker: error: the models do not fit the device budget"), proc.stderr
    assert "raise [device] budget" in last


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.model_factory import make_model

    return make_model(
        tmp_path_factory.mktemp("models") / "tiny",
        hidden=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate=128,
        init_std=0.1,
        seed=5,
    )


def engine_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    import engine

    with engine.Engine(engine.EngineConfig(budget_bytes=256 * 2**20)) as eng:
        eng.load_model("ref", str(model_dir))
        return eng.generate("ref", prompt_ids, engine.SamplingParams(temperature=0.0, max_tokens=max_tokens))


def test_generate_json_equals_engine_greedy(tiny_model: Path) -> None:
    proc = run_cli("generate", str(tiny_model), "--prompt-ids", "1,5,9,17,33", "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    result = orjson.loads(proc.stdout)
    assert result["token_ids"] == engine_greedy(tiny_model, [1, 5, 9, 17, 33], 12)
    assert result["model"] == "tiny"
    assert result["prompt_tokens"] == 5
    assert result["finish_reason"] in ("stop", "length")
    assert result["weights"] == "f32"
    assert isinstance(result["isa"], str) and result["isa"]
    assert set(result["timings"]) == {
        "load_s",
        "prefill_ms",
        "decode_ms",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    }
    assert result["timings"]["prefill_ms"] > 0
    assert result["timings"]["prefill_tokens_per_s"] > 0
    from engine.text import Tokenizer

    assert result["text"] == Tokenizer.from_model_dir(tiny_model).decode(result["token_ids"])
    assert "loaded tiny" in proc.stderr


def test_generate_ignore_eos_runs_past_an_end_of_sequence_token(tiny_model: Path, tmp_path: Path) -> None:
    """A copy of the model whose EOS id is its third greedy token: without the flag generation stops
    there, with --ignore-eos it runs to --max-tokens."""
    import json
    import shutil

    greedy = engine_greedy(tiny_model, [1, 5, 9, 17, 33], 12)
    eos = greedy[2]
    model = tmp_path / "eos-model"
    shutil.copytree(tiny_model, model)
    for name in ("config.json", "generation_config.json"):
        path = model / name
        if path.exists():
            doc = json.loads(path.read_text())
            doc["eos_token_id"] = eos
            path.write_text(json.dumps(doc))
    base = ("generate", str(model), "--prompt-ids", "1,5,9,17,33", "--max-tokens", "12", "--json")
    stopped = orjson.loads(run_cli(*base).stdout)
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"][-1] == eos
    assert len(stopped["token_ids"]) == greedy.index(eos) + 1
    full = orjson.loads(run_cli(*base, "--ignore-eos").stdout)
    assert full["finish_reason"] == "length" and full["token_ids"] == greedy


def test_generate_streams_the_text_of_the_greedy_tokens(tiny_model: Path) -> None:
    from engine.text import Tokenizer

    tok = Tokenizer.from_model_dir(tiny_model)
    proc = run_cli("generate", str(tiny_model), "--prompt", "The quick brown fox", "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    expected = engine_greedy(tiny_model, tok.encode("The quick brown fox", add_special_tokens=True), 16)
    assert proc.stdout == tok.decode(expected) + "\n"
    assert "prompt tokens in" in proc.stderr
    assert f"{len(expected)} generated" in proc.stderr


def test_generate_chat_sends_the_prompt_through_the_chat_template(tiny_model: Path) -> None:
    from engine.text import Tokenizer

    tok = Tokenizer.from_model_dir(tiny_model)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    ids = tok.encode(chat, add_special_tokens=False)
    proc = run_cli("generate", str(tiny_model), "--prompt", "Hello", "--chat", "--max-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    result = orjson.loads(proc.stdout)
    assert result["prompt_tokens"] == len(ids)
    assert result["token_ids"] == engine_greedy(tiny_model, ids, 6)


def test_generate_with_a_seed_is_reproducible(tiny_model: Path) -> None:
    args = (
        "generate",
        str(tiny_model),
        "--prompt-ids",
        "3,4,5",
        "--max-tokens",
        "10",
        "--temperature",
        "1.5",
        "--seed",
        "42",
        "--json",
    )
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert orjson.loads(first.stdout)["token_ids"] == orjson.loads(second.stdout)["token_ids"]


def test_generate_with_a_token_id_outside_the_vocabulary_exits_2(tiny_model: Path) -> None:
    proc = run_cli("generate", str(tiny_model), "--prompt-ids", "1,99999")
    assert proc.returncode == 2
    assert "99999" in proc.stderr and "vocabulary" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_with_a_prompt_that_is_not_utf8_exits_2_in_one_line(tiny_model: Path) -> None:
    proc = run_cli("generate", str(tiny_model), "--prompt", os.fsdecode(b"caf\xe9 au lait"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        ("layermux generate: error: prompt: expected valid Unicode text in prompt, found a lone surrogate; "
         "pass the prompt as UTF-8 text")]


@pytest.mark.parametrize("flag", ["--max-tokens", "--seed"])
def test_generate_with_a_number_past_the_protocol_range_exits_2_in_one_line(tiny_model: Path, flag: str) -> None:
    proc = run_cli("generate", str(tiny_model), "--prompt-ids", "1,2", flag, "999999999999999999999")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "expected less than or equal to" in lines[0], proc.stderr


def test_generate_names_a_broken_config_json(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "broken-config"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text("{not json")
    proc = run_cli("generate", str(model), "--prompt", "hi")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{model / 'config.json'}: not valid JSON" in lines[0], proc.stderr
    assert "tokenizer" not in lines[0]


def test_generate_chat_without_a_template_exits_2_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    import json
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    proc = run_cli("generate", str(model), "--prompt", "hi", "--chat")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no chat template" in lines[0] and "without --chat" in lines[0], proc.stderr


def test_generate_chat_on_a_folder_saved_by_transformers(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "saved"
    shutil.copytree(tiny_model, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(model))
    assert (model / "chat_template.jinja").is_file()
    proc = run_cli("generate", str(model), "--prompt", "Hello", "--chat", "--max-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["token_ids"]


def test_generate_on_a_folder_without_a_model_exits_2(tmp_path: Path) -> None:
    proc = run_cli("generate", str(tmp_path), "--prompt-ids", "1,2")
    assert proc.returncode == 2
    assert "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("generate", str(tmp_path), "--prompt", "hi")
    assert proc.returncode == 2
    assert "tokenizer" in proc.stderr


def test_generate_with_a_budget_too_small_for_the_model_exits_1_with_the_numbers(tiny_model: Path) -> None:
    proc = run_cli("generate", str(tiny_model), "--prompt-ids", "1,2", "--budget", "64KiB")
    assert proc.returncode == 1
    assert "cannot load model 'tiny'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- status


def _write_worker_state(client: redis.Redis, prefix: str, updated_at: float) -> None:
    """The keys as a worker writes them (protocol v1: limits at startup, stats and workers every second)."""
    client.sadd(f"{prefix}:models", "smol", "qwen")
    client.hset(
        f"{prefix}:{{m:smol}}:limits",
        mapping={"max_backlog": 100, "max_tokens": 1024, "max_prompt_tokens": 2000, "n_ctx": 2048, "schema_version": 1},
    )
    client.hset(
        f"{prefix}:{{m:qwen}}:limits",
        mapping={"max_backlog": 50, "max_tokens": 512, "max_prompt_tokens": 4000, "n_ctx": 4096, "schema_version": 1},
    )
    client.hset(
        f"{prefix}:{{m:smol}}:stats",
        mapping={
            "backlog": 2,
            "running": 1,
            "admitted": 7,
            "done": 6,
            "errors": 0,
            "refused_prompt_too_long": 1,
            "queue_wait_p50_ms": 4.5,
            "queue_wait_p99_ms": 40.25,
            "updated_at": updated_at,
            "worker": "w-1",
        },
    )
    client.xadd(f"{prefix}:{{m:smol}}:req", {"data": b"{}"})
    client.xadd(f"{prefix}:{{m:smol}}:req:high", {"data": b"{}"})
    ledger = {
        "budget_bytes": 64 * 2**20,
        "cap_bytes": int(0.9 * 64 * 2**20),
        "used_bytes": 30 * 2**20,
        "headroom_bytes": int(0.9 * 64 * 2**20) - 30 * 2**20,
        "eviction": "belady",
        "prefetch_depth": 2,
        "models": {
            "smol": {"weights_bytes": 12 * 2**20, "kv_bytes": 2 * 2**20, "workspace_bytes": 2**20},
            "qwen": {"weights_bytes": 14 * 2**20, "kv_bytes": 0, "workspace_bytes": 2**20},
        },
    }
    models = {
        "smol": {"resident": True, "sched_weight": 2.0, "n_running": 1, "n_waiting": 1},
        "qwen": {"resident": False, "sched_weight": 1.0, "n_running": 0, "n_waiting": 0},
    }
    client.hset(
        f"{prefix}:workers",
        "w-1",
        orjson.dumps({"models": models, "ledger": ledger, "queues": {}, "updated_at": updated_at}),
    )


def test_status_json_reports_models_backlog_and_ledger(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("st1")
    _write_worker_state(client, prefix, time.time())
    client.close()
    proc = run_cli("status", "--redis-url", redis_url, "--prefix", prefix, "--json")
    assert proc.returncode == 0, proc.stderr
    snap: dict[str, Any] = orjson.loads(proc.stdout)
    assert sorted(snap["models"]) == ["qwen", "smol"]
    smol = snap["models"]["smol"]
    assert smol["backlog"] == 2 and smol["backlog_by_band"] == {"high": 1, "normal": 1, "low": 0}
    assert smol["limits"]["max_backlog"] == 100
    assert smol["stats"]["queue_wait_p99_ms"] == 40.25
    assert smol["stats"]["worker"] == "w-1"
    assert snap["models"]["qwen"] == {
        "backlog": 0,
        "backlog_by_band": {"high": 0, "normal": 0, "low": 0},
        "limits": {"max_backlog": 50, "max_tokens": 512, "max_prompt_tokens": 4000, "n_ctx": 4096, "schema_version": 1},
        "stats": {},
    }
    worker = snap["workers"]["w-1"]
    assert worker["ledger"]["budget_bytes"] == 64 * 2**20
    assert worker["ledger"]["models"]["qwen"]["weights_bytes"] == 14 * 2**20
    assert worker["stale"] is False


def test_status_tables_humanise_bytes_and_flag_stale_workers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("st2")
    _write_worker_state(client, prefix, time.time() - 60.0)
    client.close()
    proc = run_cli("status", "--redis-url", redis_url, "--prefix", prefix)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "budget 64.0 MiB" in text
    assert "used 30.0 MiB" in text
    assert "STALE" in text
    smol_row = next(line for line in text.splitlines() if line.strip().startswith("smol") and "MiB" in line)
    assert smol_row.split()[1:5] == ["12.0", "MiB", "2.0", "MiB"]
    assert "resident" in smol_row
    qwen_row = next(line for line in text.splitlines() if line.strip().startswith("qwen") and "MiB" in line)
    assert "streamed" in qwen_row


def test_status_on_an_empty_prefix_says_no_worker(redis_url: str) -> None:
    proc = run_cli("status", "--redis-url", redis_url, "--prefix", fresh_prefix("nobody"))
    assert proc.returncode == 0, proc.stderr
    assert "no models served" in proc.stdout
    assert "no workers registered" in proc.stdout


def test_status_without_redis_exits_1_with_the_url() -> None:
    proc = run_cli("status", "--redis-url", "redis://127.0.0.1:1/0")
    assert proc.returncode == 1
    assert "cannot read status from Redis at redis://127.0.0.1:1/0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_reads_redis_url_from_the_environment(redis_url: str) -> None:
    proc = run_cli("status", "--json", "--prefix", fresh_prefix("env"), env={"LAYERMUX_REDIS_URL": redis_url})
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["models"] == {}


def test_status_watch_json_prints_one_object_per_refresh_until_interrupted(redis_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "status", "--redis-url", redis_url, "--json", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        # A shell starts background jobs with SIGINT ignored, and a child inherits that: give the
        # command the disposition it has when a user runs it in a terminal (Python then turns
        # SIGINT into KeyboardInterrupt), whatever started this test run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (no threads run it)
    ) as proc:  # the context closes the pipes and reaps the process, whatever happens
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # the first snapshot is out: the loop is running
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            rest, stderr = proc.communicate(timeout=60)  # bounds the wait only; a busy machine is slow
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr  # interrupted: 130, as documented
    assert "Traceback" not in stderr
    lines = [first, *rest.splitlines()]
    assert len(lines) >= 2
    assert all(orjson.loads(line)["prefix"] == "lmx" for line in lines)


def test_humanize_bytes() -> None:
    assert status.humanize_bytes(0) == "0 B"
    assert status.humanize_bytes(1023) == "1023 B"
    assert status.humanize_bytes(1536) == "1.5 KiB"
    assert status.humanize_bytes(3 * 2**30) == "3.0 GiB"
    assert status.humanize_bytes(None) == "-"


# --------------------------------------------------------------------------- submit


def _serve_one(client: redis.Redis, prefix: str, model: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Play a worker by hand: take the next request of `model` and publish `events` for it."""
    from producer_sdk import decode_event, decode_request, encode_event

    reply = client.xread({f"{prefix}:{{m:{model}}}:req": "0-0"}, count=1, block=20_000)
    assert reply, "the submit command enqueued nothing"
    (_, [(_, fields)]) = reply[0]
    request = decode_request(fields[b"data"])
    for event in events:
        event = {"v": 1, "request_id": request.request_id, **event}
        data = encode_event(decode_event(orjson.dumps(event)))
        client.xadd(f"{prefix}:{{r:{request.request_id}}}:events", {"data": data})
    return request.model_dump()


def _start_submit(redis_url: str, prefix: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "submit", *args, "--redis-url", redis_url, "--prefix", prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _served(client: redis.Redis, prefix: str, model: str, *, heartbeat_age_s: float | None = 0.0) -> None:
    """The keys of a worker serving `model`: limits, and (unless heartbeat_age_s is None) its P:workers
    entry as refreshed heartbeat_age_s ago."""
    client.sadd(f"{prefix}:models", model)
    client.hset(
        f"{prefix}:{{m:{model}}}:limits",
        mapping={"max_backlog": 10, "max_tokens": 256, "max_prompt_tokens": 512, "n_ctx": 1024, "schema_version": 1},
    )
    if heartbeat_age_s is not None:
        entry = {"models": {model: {}}, "ledger": {}, "updated_at": time.time() - heartbeat_age_s}
        client.hset(f"{prefix}:workers", "w-test", orjson.dumps(entry))


@pytest.mark.parametrize("heartbeat_age_s", [None, 60.0], ids=["no-worker-entry", "stale-worker"])
def test_submit_without_a_live_worker_says_so_and_queues_nothing(redis_url: str,
                                                                 heartbeat_age_s: float | None) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("nolive")
    _served(client, prefix, "smol", heartbeat_age_s=heartbeat_age_s)
    proc = run_cli("submit", "smol", "hi", "--redis-url", redis_url, "--prefix", prefix)
    try:
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "no live worker serves model 'smol'" in lines[0], proc.stderr
        assert "--wait-for-worker" in lines[0]
        assert client.xlen(f"{prefix}:{{m:smol}}:req") == 0
    finally:
        client.close()


def test_submit_wait_for_worker_queues_and_gets_the_reply_once_a_worker_comes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("waitw")
    _served(client, prefix, "smol", heartbeat_age_s=None)
    proc = _start_submit(redis_url, prefix, "smol", "hi", "--wait-for-worker")
    try:
        _serve_one(client, prefix, "smol", [
            {"type": "started", "worker": "w-late", "attempt": 1, "prompt_tokens": 1},
            {"type": "done", "finish_reason": "stop", "text": "", "token_ids": [], "usage": USAGE}])
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        client.close()
    assert proc.returncode == 0, stderr
    assert "no live worker serves model 'smol'" in stderr and "waits in the queue" in stderr


def test_submit_timeout_cancels_the_request_and_exits_1(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("tmo")
    _served(client, prefix, "smol")  # a live worker entry, but nobody answers
    try:
        proc = run_cli("submit", "smol", "hi", "--timeout", "0.5", "--redis-url", redis_url, "--prefix", prefix)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        m = re.search(r"no complete reply within --timeout 0.5 s; cancelled request (\S+)", proc.stderr)
        assert m is not None, proc.stderr
        assert client.sismember(f"{prefix}:{{m:smol}}:cancel", m.group(1))
    finally:
        client.close()


USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 3,
    "queue_ms": 1.5,
    "prefill_ms": 2.0,
    "decode_ms": 3.0,
    "total_ms": 7.0,
}


def test_submit_streams_token_text_and_reports_usage(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("sub1")
    _served(client, prefix, "smol")
    proc = _start_submit(
        redis_url, prefix, "smol", "Hello there", "--max-tokens", "3", "--seed", "7", "--temperature", "0"
    )
    try:
        request = _serve_one(
            client,
            prefix,
            "smol",
            [
                {"type": "started", "worker": "w-test", "attempt": 1, "prompt_tokens": 5},
                {"type": "token", "index": 0, "token_ids": [11, 12], "text": "Hi "},
                {"type": "token", "index": 2, "token_ids": [13], "text": "you"},
                {
                    "type": "done",
                    "finish_reason": "length",
                    "text": "Hi you",
                    "token_ids": [11, 12, 13],
                    "usage": USAGE,
                },
            ],
        )
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        client.close()
    assert proc.returncode == 0, stderr
    assert stdout == "Hi you\n"
    assert request["prompt"] == "Hello there"
    assert request["params"]["max_tokens"] == 3
    assert request["params"]["seed"] == 7
    assert request["params"]["temperature"] == 0.0
    assert "started on worker w-test" in stderr
    assert "3 completion tokens" in stderr
    assert "finish: length" in stderr


def test_submit_chat_json_prints_one_object(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("sub2")
    _served(client, prefix, "qwen")
    proc = _start_submit(redis_url, prefix, "qwen", "What is up?", "--chat", "--json")
    try:
        request = _serve_one(
            client,
            prefix,
            "qwen",
            [
                {"type": "started", "worker": "w-test", "attempt": 1, "prompt_tokens": 5},
                {"type": "token", "index": 0, "token_ids": [7], "text": "ok"},
                {"type": "done", "finish_reason": "stop", "text": "ok", "token_ids": [7], "usage": USAGE},
            ],
        )
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        client.close()
    assert proc.returncode == 0, stderr
    assert request["messages"] == [{"role": "user", "content": "What is up?"}]
    result = orjson.loads(stdout)
    assert result["text"] == "ok"
    assert result["token_ids"] == [7]
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == 3


def test_submit_error_event_exits_1_with_code_and_numbers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("sub3")
    _served(client, prefix, "smol")
    proc = _start_submit(redis_url, prefix, "smol", "a very long prompt")
    try:
        _serve_one(
            client,
            prefix,
            "smol",
            [
                {
                    "type": "error",
                    "code": "prompt_too_long",
                    "message": "prompt has 900 tokens, limit 512",
                    "details": {"needed": 900, "limit": 512},
                },
            ],
        )
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        client.close()
    assert proc.returncode == 1
    assert "prompt_too_long: prompt has 900 tokens, limit 512" in stderr
    assert '"needed":900' in stderr
    assert "Traceback" not in stderr


def test_submit_to_an_unserved_model_exits_1(redis_url: str) -> None:
    proc = run_cli("submit", "ghost", "hi", "--redis-url", redis_url, "--prefix", fresh_prefix("sub4"))
    assert proc.returncode == 1
    assert "unknown_model: no worker serves model 'ghost'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_submit_with_an_invalid_model_name_exits_2(redis_url: str) -> None:
    proc = run_cli("submit", "bad name!", "hi", "--redis-url", redis_url)
    assert proc.returncode == 2
    assert "model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_submit_when_the_queue_is_full_exits_1(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = fresh_prefix("sub5")
    _served(client, prefix, "smol")
    client.hset(f"{prefix}:{{m:smol}}:limits", "max_backlog", 1)
    client.xadd(f"{prefix}:{{m:smol}}:req", {"data": b"{}"})
    client.close()
    proc = run_cli("submit", "smol", "hi", "--redis-url", redis_url, "--prefix", prefix)
    assert proc.returncode == 1
    assert "queue_full" in proc.stderr


# --------------------------------------------------------------------------- against a real worker


WORKER_STOP_TIMEOUT_S = 10.0  # then SIGKILL: shutdown itself is the worker suite's subject


@pytest.fixture
def running_worker(tiny_model: Path, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A `layermux worker` process serving `tiny` under a fresh prefix; yields the prefix."""
    prefix = fresh_prefix("w")
    config = tmp_path / "worker.toml"
    config.write_text(
        f'redis_url = "{redis_url}"\nkey_prefix = "{prefix}"\nworker_id = "cli-test-worker"\n'
        f'[device]\nbudget = "256MiB"\n'
        f'[[models]]\nname = "tiny"\npath = "{tiny_model}"\n'
    )
    log = (tmp_path / "worker.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=env,
    )
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while not client.hexists(f"{prefix}:workers", "cli-test-worker"):
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        yield prefix
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_status_json_shows_a_running_workers_models_and_ledger(running_worker: str, redis_url: str) -> None:
    proc = run_cli("status", "--redis-url", redis_url, "--prefix", running_worker, "--json")
    assert proc.returncode == 0, proc.stderr
    snap = orjson.loads(proc.stdout)
    tiny = snap["models"]["tiny"]
    assert tiny["backlog"] == 0
    assert tiny["backlog_by_band"] == {"high": 0, "normal": 0, "low": 0}
    assert tiny["limits"]["n_ctx"] == 512
    worker = snap["workers"]["cli-test-worker"]
    ledger = worker["ledger"]
    assert ledger["budget_bytes"] == 256 * 2**20
    assert 0 < ledger["used_bytes"] <= ledger["cap_bytes"]
    assert ledger["models"]["tiny"]["weights_bytes"] > 0
    assert worker["models"]["tiny"]["resident"] is True
    assert worker["models"]["tiny"]["weights"] == worker["models"]["tiny"]["matrix_format"]  # exact: as stored
    assert worker["stale"] is False
    text = run_cli("status", "--redis-url", redis_url, "--prefix", running_worker).stdout
    assert "worker cli-test-worker" in text
    assert "device: budget 256 MiB" in text
    assert "matmul exact" in text and "priority aging 5.0" in text


def test_submit_to_a_running_worker_streams_the_same_greedy_tokens_as_generate(
    running_worker: str, redis_url: str, tiny_model: Path
) -> None:
    local = run_cli("generate", str(tiny_model), "--prompt", "Hello", "--chat", "--max-tokens", "10", "--json")
    assert local.returncode == 0, local.stderr
    remote = run_cli(
        "submit",
        "tiny",
        "Hello",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "10",
        "--json",
        "--redis-url",
        redis_url,
        "--prefix",
        running_worker,
    )
    assert remote.returncode == 0, remote.stderr
    local_result, remote_result = orjson.loads(local.stdout), orjson.loads(remote.stdout)
    assert remote_result["token_ids"] == local_result["token_ids"]
    assert remote_result["text"] == local_result["text"]
    assert remote_result["usage"]["prompt_tokens"] == local_result["prompt_tokens"]
    assert "started on worker cli-test-worker" in remote.stderr


def test_submit_takes_generate_s_sampling_flags_and_gives_its_tokens(
    running_worker: str, redis_url: str, tiny_model: Path
) -> None:
    """Every sampling flag of `generate` exists on `submit` and reaches the worker: the same greedy
    run with penalties, top-k and a stop string gives the same ids and text both ways, and differs
    from the run without them (so a flag dropped on the way fails this test)."""
    shaping = ["--top-k", "3", "--repetition-penalty", "1.3", "--presence-penalty", "0.7",
               "--frequency-penalty", "0.4", "--max-tokens", "12", "--temperature", "0"]
    local = run_cli("generate", str(tiny_model), "--prompt", "Hello", "--json", *shaping)
    assert local.returncode == 0, local.stderr
    local_result = orjson.loads(local.stdout)
    plain = orjson.loads(run_cli("generate", str(tiny_model), "--prompt", "Hello", "--json", "--max-tokens", "12",
                                 "--ignore-eos").stdout)
    assert plain["token_ids"] != local_result["token_ids"], "the penalties changed nothing: the test cannot fail"
    stop = local_result["text"][len(local_result["text"]) // 2:][:3]
    assert stop.strip(), f"no usable stop text in {local_result['text']!r}"
    local_stopped = orjson.loads(run_cli("generate", str(tiny_model), "--prompt", "Hello", "--json", *shaping,
                                         "--stop", stop).stdout)
    remote = run_cli("submit", "tiny", "Hello", "--json", *shaping, "--stop", stop,
                     "--redis-url", redis_url, "--prefix", running_worker)
    assert remote.returncode == 0, remote.stderr
    remote_result = orjson.loads(remote.stdout)
    assert remote_result["finish_reason"] == local_stopped["finish_reason"] == "stop_string"
    assert remote_result["text"] == local_stopped["text"]
    assert remote_result["token_ids"] == local_stopped["token_ids"]


# --------------------------------------------------------------------------- Ctrl-C


def _start_worker_process(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            # the disposition a terminal gives (background shells start jobs with SIGINT ignored)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - before exec only
        )


def _wait_for(check: Any, what: str, log_path: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s  # bounds the wait only
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; log:\n{log_path.read_text()}"
        time.sleep(0.05)


def test_worker_ctrl_c_drains_and_exits_130(tiny_model: Path, redis_url: str, tmp_path: Path) -> None:
    prefix = fresh_prefix("int")
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'redis_url = "{redis_url}"\nkey_prefix = "{prefix}"\nworker_id = "int-1"\n'
                   f'[device]\nbudget = "256MiB"\n[[models]]\nname = "tiny"\npath = "{tiny_model}"\n')
    log_path = tmp_path / "worker.log"
    proc = _start_worker_process(cfg, log_path)
    client = redis.Redis.from_url(redis_url)
    try:
        _wait_for(lambda: client.hexists(f"{prefix}:workers", "int-1"), "the worker to be ready", log_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.close()
    log = log_path.read_text()
    assert "press Ctrl-C again to stop at once" in log
    assert "Traceback" not in log


def test_worker_second_ctrl_c_forces_exit_without_draining(tmp_path: Path, redis_url: str) -> None:
    from tools.model_factory import make_model

    model = make_model(tmp_path / "slow", hidden=256, n_layers=8, n_heads=8, n_kv_heads=2, intermediate=768,
                       max_position_embeddings=8192, init_std=0.1, seed=9)
    prefix = fresh_prefix("int2")
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'redis_url = "{redis_url}"\nkey_prefix = "{prefix}"\nworker_id = "int-2"\n'
                   "drain_timeout_s = 600\n"
                   f'[device]\nbudget = "512MiB"\nn_threads = 1\n[[models]]\nname = "slow"\npath = "{model}"\n'
                   "max_tokens_limit = 8000\n")
    log_path = tmp_path / "worker.log"
    proc = _start_worker_process(cfg, log_path)
    client = redis.Redis.from_url(redis_url)
    try:
        from producer_sdk import Producer

        _wait_for(lambda: client.hexists(f"{prefix}:workers", "int-2"), "the worker to be ready", log_path)
        with Producer(redis_url, prefix) as producer:
            handle = producer.submit("slow", prompt_ids=[1, 2, 3], max_tokens=8000, ignore_eos=True, temperature=0.0)
            _wait_for(lambda: client.xlen(f"{prefix}:{{r:{handle.request_id}}}:events") >= 2,
                      "the request's first tokens", log_path)
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: "press Ctrl-C again" in log_path.read_text(), "the first interrupt's message", log_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log_path.read_text()
        # Forced: the request did not get to finish (a drain would have run it to its done event).
        kinds = [orjson.loads(f[b"data"])["type"] for _, f in
                 client.xrange(f"{prefix}:{{r:{handle.request_id}}}:events")]
        assert "done" not in kinds, kinds
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.close()
    log = log_path.read_text()
    assert "SIGINT again: stopping now without draining" in log
    assert "Traceback" not in log


# --------------------------------------------------------------------------- the Redis a newcomer gets


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_layermux_redis_runs_a_server_prints_the_export_line_and_exits_130_on_ctrl_c(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "redis", "--port", str(port)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - before exec only
    ) as proc:
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            export = proc.stdout.readline().strip()
            url = f"redis://127.0.0.1:{port}/0"
            assert export == f"in other shells: export LAYERMUX_REDIS_URL={url}"
            client = redis.Redis.from_url(url)
            assert client.ping()
            client.close()
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()


def test_layermux_redis_on_a_taken_port_says_so(redis_server: Any) -> None:
    proc = run_cli("redis", "--port", str(redis_server.port))
    assert proc.returncode == 1, proc.stderr
    assert f"port {redis_server.port} is in use" in proc.stderr and "Traceback" not in proc.stderr


def test_worker_with_embedded_redis_prints_the_url_to_export(tiny_model: Path, tmp_path: Path) -> None:
    cfg = _worker_config(tmp_path / "w.toml", tiny_model, redis_url=None)
    log_path = tmp_path / "worker.log"
    proc = _start_worker_process(cfg, log_path)
    try:
        _wait_for(lambda: "export LAYERMUX_REDIS_URL=" in log_path.read_text(), "the export line", log_path)
        url = log_path.read_text().split("export LAYERMUX_REDIS_URL=")[1].split()[0]
        client = redis.Redis.from_url(url)
        _wait_for(lambda: client.sismember("wk:models", "tiny"), "the worker to register", log_path)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
