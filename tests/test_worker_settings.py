"""Worker settings: TOML file, LAYERMUX_* environment overrides, byte sizes, and errors that name
the field and where its value came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import ConfigError, load_settings, parse_bytes

TOML = """
redis_url = "rediss://:s3cret@redis.example:6380/2"
key_prefix = "lmxtest"
worker_id = "w-1"
drain_timeout_s = 12.5
metrics_port = 9108

[device]
budget = "8GiB"
cap_fraction = 0.8
eviction = "lru"

[[models]]
name = "smol"
path = "/models/smol"
weights = "q8_0"
max_running = 16

[[models]]
name = "qwen2-0.5b"
path = "/models/qwen"
sched_weight = 2.0
residency = "streamed"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LAYERMUX_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "layermux.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "n_bytes"),
    [("8GiB", 8 << 30), ("600MiB", 600 << 20), ("1.5GB", 1_500_000_000), (4096, 4096), ("4096", 4096),
     ("2 GiB", 2 << 30), ("512k", 512_000), ("1Ki", 1024), ("1.5gib", 3 << 29)],
)
def test_parse_bytes_accepts_binary_si_and_plain_sizes(text: object, n_bytes: int) -> None:
    assert parse_bytes(text) == n_bytes


@pytest.mark.parametrize("bad", ["", "GiB", "8 GiBs", "-1GiB", "0", 0, -5, True, 1.5, "1e9", None, "8XB"])
def test_parse_bytes_refuses_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_toml_file_is_read_with_defaults_for_the_rest(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, TOML))
    assert s.redis_url == "rediss://:s3cret@redis.example:6380/2"
    assert (s.key_prefix, s.worker_id, s.drain_timeout_s, s.metrics_port) == ("lmxtest", "w-1", 12.5, 9108)
    assert s.device.budget == 8 << 30 and s.device.cap_fraction == 0.8 and s.device.eviction == "lru"
    assert s.device.kv_block_tokens == 16 and s.device.max_batch_tokens == 512
    assert [m.name for m in s.models] == ["smol", "qwen2-0.5b"]
    smol, qwen = s.models
    assert (smol.weights, smol.max_running, smol.max_backlog, smol.max_tokens_limit) == ("q8_0", 16, 1000, 4096)
    assert (qwen.sched_weight, qwen.residency, qwen.weights) == (2.0, "streamed", "auto")
    assert (s.reply_ttl_s, s.max_deliveries, s.lease_idle_ms, s.stats_interval_s) == (3600, 5, 30000, 1.0)


def test_defaults_without_a_file() -> None:
    s = load_settings()
    assert s.redis_url is None and s.key_prefix == "lmx" and s.models == []
    assert s.device.budget == 2 << 30 and s.device.cap_fraction == 0.9
    assert s.worker_id.rsplit("-", 1)[1].isdigit()


def test_environment_overrides_the_file_field_by_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERMUX_DEVICE__BUDGET", "600MiB")
    monkeypatch.setenv("LAYERMUX_REDIS_URL", "redis://:pw@localhost:6379/0")
    monkeypatch.setenv("LAYERMUX_MAX_DELIVERIES", "9")
    s = load_settings(write(tmp_path, TOML))
    assert s.device.budget == 600 << 20
    assert s.device.cap_fraction == 0.8  # still from the file: nested sections merge
    assert s.redis_url == "redis://:pw@localhost:6379/0"
    assert s.max_deliveries == 9
    assert len(s.models) == 2


def test_config_path_from_environment_and_models_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERMUX_CONFIG", str(write(tmp_path, TOML)))
    monkeypatch.setenv("LAYERMUX_MODELS", '[{"name": "only", "path": "/m"}]')
    s = load_settings()
    assert s.key_prefix == "lmxtest"
    assert [m.name for m in s.models] == ["only"]


def test_bad_value_in_file_names_field_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, TOML.replace('budget = "8GiB"', 'budget = "lots"'))
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "device.budget" in str(e.value) and str(path) in str(e.value) and "lots" in str(e.value)


def test_bad_value_in_environment_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERMUX_DEVICE__CAP_FRACTION", "1.5")
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, TOML))
    assert "device.cap_fraction" in str(e.value) and "LAYERMUX_DEVICE__CAP_FRACTION" in str(e.value)


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        ('[[models]]\nname = "bad name"\npath = "/m"\n', "models[0].name"),
        ('[[models]]\nname = "m"\npath = "/m"\nmax_running = 0\n', "models[0].max_running"),
        ('[[models]]\nname = "m"\npath = "/m"\nweights = "q3"\n', "models[0].weights"),
        ('[[models]]\nname = "m"\n', "models[0].path"),
        ('[device]\neviction = "fifo"\n', "device.eviction"),
        ('[device]\nbudgett = "1GiB"\n', "device.budgett"),
        ('redis_url = "http://x"\n', "redis_url"),
        ('key_prefix = "a{b}"\n', "key_prefix"),
        ('metrics_port = 70000\n', "metrics_port"),
        ('[[models]]\nname = "m"\npath = "/a"\n[[models]]\nname = "m"\npath = "/b"\n', "appears twice"),
    ],
)
def test_each_bad_setting_is_named(tmp_path: Path, snippet: str, field: str) -> None:
    path = write(tmp_path, snippet)
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert field in str(e.value)
    assert str(path) in str(e.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML") as e:
        load_settings(write(tmp_path, "[device\nbudget = 1"))
    assert "layermux.toml" in str(e.value)


def test_keyword_overrides_win(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, TOML), redis_url=None, worker_id="override")
    assert s.redis_url is None and s.worker_id == "override"
