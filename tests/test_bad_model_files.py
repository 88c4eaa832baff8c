"""A bad model folder is refused with an error that says where and what, and costs nothing else.

Each case copies a good factory folder, breaks one thing, and asks the engine to
load it. Expected: UnsupportedModelError for a valid file asking for what we do
not implement (architecture, tensor dtype, RoPE type), ModelFileError for
anything missing, corrupt, truncated or inconsistent; the message names the
file, the tensor or field, and what was expected and found. Afterwards the
ledger is back where it was, the name is free again, and a model loaded before
still generates the same tokens.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Engine, EngineConfig, SamplingParams
from engine.errors import ModelFileError, UnsupportedModelError
from tools.model_factory import (
    make_model,
    model_tensor_specs,
    read_safetensors_header,
    tokenizer_size,
    write_safetensors,
)

HIDDEN, N_HEADS, N_KV, FFN, N_LAYERS = 64, 4, 2, 128, 2
# Size of the good single file's data section (f32; lm_head.weight is stored last).
DATA_BYTES = 4 * sum(int(np.prod(t.shape)) for t in model_tensor_specs(
    arch="llama", hidden=HIDDEN, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, intermediate=FFN,
    vocab=tokenizer_size(), tie_embeddings=False))
Q_BYTES = 4 * HIDDEN * HIDDEN
TRUNCATE_BYTES = 100
SHARDED_FILES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


# ---------------------------------------------------------------------------
# Breaking folders
# ---------------------------------------------------------------------------

def edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_header(st_path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrites a safetensors file's header with edit(header) applied; the data section is kept byte for byte."""
    header, start = read_safetensors_header(st_path)
    data = st_path.read_bytes()[start:]
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    st_path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def replace_tensors(st_path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Rewrites an f32 safetensors file after edit(tensors) changed its dict of arrays."""
    header, start = read_safetensors_header(st_path)
    blob = st_path.read_bytes()
    tensors: dict[str, np.ndarray] = {}
    for name, h in header.items():
        if name != "__metadata__":
            b, e = h["data_offsets"]
            tensors[name] = np.frombuffer(blob[start + b:start + e], dtype="<f4").reshape(h["shape"])
    edit(tensors)
    write_safetensors(st_path, tensors)


def last_tensor(st_path: Path) -> tuple[str, int, int]:
    """(name, data_offsets end, data section size) of the tensor stored last in the file."""
    header, start = read_safetensors_header(st_path)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    return name, header[name]["data_offsets"][1], st_path.stat().st_size - start


@dataclass
class Case:
    """break_(folder) damages a copy of the good folder; the message must match every
    regular expression in `says` (case-insensitive): file, tensor or field, expected, found."""

    break_: Callable[[Path], None]
    error: type[Exception]
    says: list[str]
    sharded: bool = False


def _unknown_arch(p: Path) -> None:
    edit_config(p, architectures=["MambaForCausalLM"], model_type="mamba")


def _i64_tensor(p: Path) -> None:
    def edit(h: dict[str, Any]) -> None:  # same bytes, re-typed: 8-byte ints need half the elements
        h["model.layers.0.mlp.up_proj.weight"].update(dtype="I64", shape=[FFN // 2, HIDDEN])
    rewrite_header(p / "model.safetensors", edit)


def _yarn(p: Path) -> None:
    edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})


def _missing_tensor(p: Path) -> None:
    def edit(t: dict[str, np.ndarray]) -> None:
        del t["model.layers.1.self_attn.k_proj.weight"]
    replace_tensors(p / "model.safetensors", edit)


def _wrong_shape(p: Path) -> None:
    def edit(t: dict[str, np.ndarray]) -> None:
        t["model.layers.0.mlp.down_proj.weight"] = np.zeros((HIDDEN, 96), np.float32)
    replace_tensors(p / "model.safetensors", edit)


def _truncated(p: Path) -> None:
    st = p / "model.safetensors"
    name, end, size = last_tensor(st)
    assert (name, end, size) == ("lm_head.weight", DATA_BYTES, DATA_BYTES)
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - TRUNCATE_BYTES)


def _truncated_in_header(p: Path) -> None:
    st = p / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(64)


def _offsets_past_end(p: Path) -> None:
    def edit(h: dict[str, Any]) -> None:
        b, e = h["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]
        assert e - b == Q_BYTES
        h["model.layers.0.self_attn.q_proj.weight"]["data_offsets"] = [DATA_BYTES + 64, DATA_BYTES + 64 + Q_BYTES]
    rewrite_header(p / "model.safetensors", edit)


def _header_not_json(p: Path) -> None:
    st = p / "model.safetensors"
    blob = bytearray(st.read_bytes())
    blob[8] = ord("[")  # '{' -> '[': still the same length, no longer the JSON object of the format
    blob[9:13] = b"@@@@"
    st.write_bytes(bytes(blob))


def _hidden_disagrees(p: Path) -> None:  # config says 48 wide; tensors are 64 wide
    edit_config(p, hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=16)


def _too_many_layers(p: Path) -> None:
    edit_config(p, num_hidden_layers=N_LAYERS + 1)


def _vocab_disagrees(p: Path) -> None:
    edit_config(p, vocab_size=1000)


def _no_config(p: Path) -> None:
    (p / "config.json").unlink()


def _config_not_json(p: Path) -> None:
    (p / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')


def _missing_shard(p: Path) -> None:
    (p / SHARDED_FILES[1]).unlink()


def _no_weights(p: Path) -> None:
    (p / "model.safetensors").unlink()


def lit(*alternatives: str) -> str:
    """A pattern matching any of the literal strings."""
    return "|".join(re.escape(a) for a in alternatives)


def num(n: int) -> str:
    """A pattern matching the number n on its own (not inside 480)."""
    return rf"(?<!\d){n}(?!\d)"


def shape(*dims: int) -> str:
    """A pattern matching a shape written [a, b] or (a, b)."""
    return r"[\[(]" + r",\s*".join(str(d) for d in dims) + r"[\])]"


CASES: dict[str, Case] = {
    "unknown_architecture": Case(_unknown_arch, UnsupportedModelError,
                                 [lit("config.json"), lit("architectures", "model_type"),
                                  lit("MambaForCausalLM", "mamba"), lit("LlamaForCausalLM")]),
    "unsupported_tensor_dtype": Case(_i64_tensor, UnsupportedModelError,
                                     [lit("model.safetensors"), lit("model.layers.0.mlp.up_proj.weight"), lit("I64"),
                                      lit("F32")]),
    "unsupported_rope_type": Case(_yarn, UnsupportedModelError,
                                  [lit("config.json"), lit("rope_scaling", "rope_type"), lit("yarn"), lit("llama3")]),
    "missing_tensor": Case(_missing_tensor, ModelFileError,
                           [lit("model.safetensors"), lit("model.layers.1.self_attn.k_proj.weight")]),
    "wrong_shape": Case(_wrong_shape, ModelFileError,
                        [lit("model.safetensors"), lit("model.layers.0.mlp.down_proj.weight"), shape(HIDDEN, FFN),
                         shape(HIDDEN, 96)]),
    "truncated_file": Case(_truncated, ModelFileError,
                           [lit("model.safetensors"), lit("lm_head.weight"), lit("truncated", "past the end"),
                            num(DATA_BYTES), num(DATA_BYTES - TRUNCATE_BYTES)]),
    "truncated_inside_header": Case(_truncated_in_header, ModelFileError,
                                    [lit("model.safetensors"), lit("header"), num(64), r"header length \d+"]),
    "offsets_past_end": Case(_offsets_past_end, ModelFileError,
                             [lit("model.safetensors"), lit("model.layers.0.self_attn.q_proj.weight"),
                              lit("past the end", "beyond", "exceed"), num(DATA_BYTES + 64 + Q_BYTES),
                              num(DATA_BYTES)]),
    "header_not_json": Case(_header_not_json, ModelFileError, [lit("model.safetensors"), lit("json")]),
    "hidden_size_disagrees_with_tensors": Case(_hidden_disagrees, ModelFileError,
                                               [lit("model.safetensors", "config.json"), r"model\.\S+weight",
                                                num(48), num(HIDDEN)]),
    "more_layers_in_config_than_in_files": Case(_too_many_layers, ModelFileError,
                                                [lit("model.safetensors"), lit(f"model.layers.{N_LAYERS}.")]),
    "vocab_size_disagrees_with_embedding": Case(_vocab_disagrees, ModelFileError,
                                                [lit("model.safetensors", "config.json"), num(1000),
                                                 lit("embed_tokens", "lm_head", "vocab_size")]),
    "missing_config": Case(_no_config, ModelFileError, [lit("config.json")]),
    "config_not_json": Case(_config_not_json, ModelFileError, [lit("config.json"), lit("json")]),
    "missing_weights": Case(_no_weights, ModelFileError, [lit("model.safetensors")]),
    "index_names_missing_shard": Case(_missing_shard, ModelFileError,
                                      [lit("model.safetensors.index.json"), lit(SHARDED_FILES[1])], sharded=True),
}


# ---------------------------------------------------------------------------
# Fixtures and checks
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """sharded? -> a good f32 folder to copy and break."""
    root = tmp_path_factory.mktemp("good")
    kw: dict[str, Any] = {"hidden": HIDDEN, "n_heads": N_HEADS, "n_kv_heads": N_KV, "intermediate": FFN, "n_layers": N_LAYERS,
                          "init_std": 0.2, "seed": 11}
    return {False: make_model(root / "single", **kw), True: make_model(root / "sharded", shards=2, **kw)}


@pytest.fixture(scope="module")
def eng(good_dirs: dict[bool, Path]) -> Iterator[Engine]:
    """An engine already serving one good model ("base"), so harm to it shows."""
    with Engine(EngineConfig(budget_bytes=256 << 20, kv_block_tokens=16)) as e:
        e.load_model("base", good_dirs[False])
        yield e


PROMPT = [5, 40, 77, 120, 3, 9]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def base_tokens(eng: Engine) -> list[int]:
    return eng.generate("base", PROMPT, PARAMS)


def check_message(message: str, says: list[str]) -> None:
    for pattern in says:
        assert re.search(pattern, message, re.IGNORECASE), f"message does not match {pattern!r}: {message!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_folder_is_refused_with_a_precise_error_and_costs_nothing(
        eng: Engine, good_dirs: dict[bool, Path], base_tokens: list[int], tmp_path: Path, case: str) -> None:
    spec = CASES[case]
    bad = tmp_path / case
    shutil.copytree(good_dirs[spec.sharded], bad)
    spec.break_(bad)
    used_before = eng.ledger().used_bytes
    models_before = set(eng.models())

    with pytest.raises(spec.error) as info:
        eng.load_model("bad", bad)
    if spec.error is ModelFileError:
        assert not isinstance(info.value, UnsupportedModelError), "a broken file is not an unsupported feature"
    check_message(str(info.value), spec.says)

    assert eng.ledger().used_bytes == used_before, "a failed load left bytes booked in the ledger"
    assert set(eng.models()) == models_before, "a failed load left a model registered"
    assert eng.generate("base", PROMPT, PARAMS) == base_tokens, "a failed load disturbed a loaded model"
    # The name is free again, and the same engine loads a good folder under it.
    eng.load_model("bad", good_dirs[spec.sharded])
    assert eng.generate("bad", PROMPT, PARAMS) == base_tokens
    eng.unload_model("bad")
    assert eng.ledger().used_bytes == used_before


def test_breaking_helpers_really_break_the_files(good_dirs: dict[bool, Path], tmp_path: Path) -> None:
    """The safetensors reference library refuses what the cases corrupt (so the cases test what they claim)."""
    from safetensors import safe_open

    for case in ("truncated_file", "truncated_inside_header", "offsets_past_end", "header_not_json"):
        bad = tmp_path / case
        shutil.copytree(good_dirs[False], bad)
        CASES[case].break_(bad)
        with pytest.raises(Exception) as info, safe_open(str(bad / "model.safetensors"), framework="np") as f:
            for name in f:
                f.get_tensor(name)
        assert re.search(r"(?i)invalid|error|offset|header|incomplete", str(info.value)), str(info.value)
