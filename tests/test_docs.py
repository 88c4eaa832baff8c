"""The docs say what the code does, where that can be checked mechanically: every TOML example parses
into the worker's Settings, every documented `residency` / `weights` / `eviction` value is one the
config accepts, and protocol.md's stats fields are the fields the worker writes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worker.settings import DeviceSettings, ModelSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "docs" / "protocol.md", REPO / "deploy" / "README.md",
        REPO / "deploy" / "config" / "worker.example.toml"]


def toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)


def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LAYERMUX_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("source", ["README.md", "deploy/config/worker.example.toml"])
def test_documented_config_files_parse_into_settings(source: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _isolated_env(monkeypatch)
    text = (REPO / source).read_text(encoding="utf-8")
    examples = toml_blocks(text) if source.endswith(".md") else [text]
    assert examples, f"{source} has no TOML example"
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.toml"
        path.write_text(example, encoding="utf-8")
        settings = load_settings(path)  # ConfigError names the field that drifted
        assert settings.models, f"{source}: example {i} configures no model"


def documented_values(key: str) -> set[tuple[str, str]]:
    """(file, value) of every `key = "value"` in the docs (TOML and prose alike)."""
    found = set()
    for doc in DOCS:
        for value in re.findall(rf'\b{key}\s*=\s*"([^"]*)"', doc.read_text(encoding="utf-8")):
            found.add((doc.relative_to(REPO).as_posix(), value))
    return found


@pytest.mark.parametrize("key,section", [("residency", ModelSettings), ("weights", ModelSettings),
                                         ("eviction", DeviceSettings), ("matmul_precision", DeviceSettings)])
def test_every_documented_value_is_accepted_by_the_config(key: str, section: type) -> None:
    accepted = set(section.model_fields[key].annotation.__args__)  # the Literal's values
    values = documented_values(key)
    assert values, f"no documented {key} value found"
    wrong = sorted((f, v) for f, v in values if v not in accepted)
    assert not wrong, f"documented {key} values the config rejects: {wrong}; accepted: {sorted(accepted)}"


def stats_fields_written_by_the_worker() -> set[str]:
    """The keys of the `fields` dict that Runtime.report_stats_once writes to P:{m:<model>}:stats,
    plus the ones it adds by name (refused_<code>, the queue-wait quantiles)."""
    tree = ast.parse((REPO / "worker" / "runtime.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "fields" for t in targets) and isinstance(node.value, ast.Dict):
                names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if (isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Constant)
                and isinstance(node.elts[0].value, str) and node.elts[0].value.startswith("queue_wait_")):
            names.add(node.elts[0].value)
        if isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and v.value == "refused_" for v in node.values):
            names.add("refused_<code>")
    return names


def test_protocol_stats_fields_are_the_fields_the_worker_writes() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `P:{m:<model>}:stats`"))
    documented = set(re.findall(r"`([a-z_<>0-9]+)`", row.split("|")[4]))
    written = stats_fields_written_by_the_worker()
    assert "backlog" in written and "refused_<code>" in written  # the extraction found the dict
    assert documented == written, (f"missing from protocol.md: {sorted(written - documented)}; "
                                   f"documented but not written: {sorted(documented - written)}")


def test_deploy_readme_says_the_arq_path_uses_orjson_not_pickle() -> None:
    text = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    assert "uses arq's default\n  serializer, which is pickle" not in text
    assert "orjson" in text
    from worker.arq_app import WorkerSettings, job_serializer

    assert WorkerSettings.job_serializer is job_serializer or WorkerSettings.job_serializer == job_serializer
    assert job_serializer({"a": 1}) == b'{"a":1}'


def test_the_example_config_documents_every_setting() -> None:
    """deploy/config/worker.example.toml calls itself complete: every field of the settings tree is in it
    (set, or commented out)."""
    from worker.settings import GatewaySettings, Settings

    text = (REPO / "deploy" / "config" / "worker.example.toml").read_text(encoding="utf-8")
    missing = [f"{cls.__name__}.{name}" for cls in (Settings, DeviceSettings, ModelSettings, GatewaySettings)
               for name in cls.model_fields
               if name not in ("device", "models", "gateway")
               and not re.search(rf"^#?\s*{name}\s*=|^#\s*{name}:", text, flags=re.MULTILINE)]
    assert not missing, f"settings missing from deploy/config/worker.example.toml: {missing}"
