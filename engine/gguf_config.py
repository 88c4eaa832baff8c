"""Reads a GGUF model file's metadata into the spec the C++ engine loads (see engine/src/model.h ModelSpec).

Owner: engine loaders (GGUF). Pure functions; thread-safe.

The metadata reader here parses only the header, the key/value section and the tensor names
(the C++ side, engine/src/gguf.cpp, maps and validates the tensor data). Keys are llama.cpp's:
`general.architecture` names the prefix of the model keys (`llama.block_count`,
`gemma3.attention.sliding_window`, ...); `tokenizer.ggml.*` and `tokenizer.chat_template`
feed engine/gguf_tokenizer.py. Supported architectures: llama (Llama 2/3, SmolLM2, Mistral
without a window), qwen2, qwen3 and gemma3. Gemma 3's interleave (every 6th layer global),
local RoPE base (10000) and query scale (key_length^-0.5) are not in the file; they are
transformers' and llama.cpp's defaults for the architecture, and are used here too.
Every error is one line naming the file and the key: what was expected, what was found.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engine.errors import ModelFileError, UnsupportedModelError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
# The formats a GGUF model may be loaded as: "auto" keeps each tensor's own block format.
WEIGHT_FORMATS = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


def is_gguf_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def take(self, n: int, what: str) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelFileError(f"{self.path}: truncated reading {what}: expected {n} bytes, found {len(b)}")
        return b

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > self.size:
            raise ModelFileError(f"{self.path}: {what}: string length {n} exceeds the file size {self.size}")
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, t: int, what: str, depth: int = 0) -> Any:
        if t in _SCALARS:
            return self.scalar(_SCALARS[t], what)
        if t == _STRING:
            return self.string(what)
        if t != _ARRAY or depth > 8:
            raise ModelFileError(f"{self.path}: {what}: expected a value type 0..12, found {t}")
        et = self.scalar("<I", what)
        n = self.scalar("<Q", what)
        if et in _NP:
            item = np.dtype(_NP[et]).itemsize
            if n * item > self.size:
                raise ModelFileError(f"{self.path}: {what}: array of {n} values exceeds the file size {self.size}")
            return np.frombuffer(self.take(n * item, what), dtype=_NP[et]).copy()
        if n > self.size:
            raise ModelFileError(f"{self.path}: {what}: array of {n} values exceeds the file size {self.size}")
        return [self.value(et, what, depth + 1) for _ in range(n)]


def read_gguf_metadata(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(metadata, tensor names) of a GGUF file. Numeric arrays come back as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found; expected a GGUF model file")
    size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f, path, size)
        if size < 4 or r.take(4, "the magic") != b"GGUF":
            raise ModelFileError(f"{path}: bad magic: expected the bytes 'GGUF' at offset 0; not a GGUF file")
        version = r.scalar("<I", "the version")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{path}: GGUF version: expected 2 or 3, found {version}")
        n_tensors = r.scalar("<Q", "the tensor count")
        n_kv = r.scalar("<Q", "the metadata count")
        if n_kv > size // 12 or n_tensors > size // 24:
            raise ModelFileError(f"{path}: counts ({n_tensors} tensors, {n_kv} keys) cannot fit in a {size}-byte file")
        meta: dict[str, Any] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key {i}")
            meta[key] = r.value(r.scalar("<I", f"metadata '{key}' (type)"), f"metadata '{key}'")
        names = []
        for i in range(n_tensors):
            name = r.string(f"tensor name {i}")
            n_dims = r.scalar("<I", f"tensor '{name}' (n_dims)")
            if not 1 <= n_dims <= 4:
                raise ModelFileError(f"{path}: tensor '{name}': expected 1..4 dimensions, found {n_dims}")
            r.take(8 * n_dims + 4 + 8, f"tensor '{name}'")
            names.append(name)
    return meta, names


def _get(meta: dict[str, Any], path: Path, key: str, kind: type, default: Any = None) -> Any:
    value = meta.get(key, default)
    if value is None:
        raise ModelFileError(f"{path}: metadata '{key}' is missing; expected {kind.__name__}")
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (isinstance(value, int) and kind is int and value <= 0):
        raise ModelFileError(f"{path}: metadata '{key}': expected a positive {kind.__name__}, found {value!r}")
    return value


def _rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def gguf_eos_ids(meta: dict[str, Any]) -> list[int]:
    """EOS, then EOT (llama.cpp stops on both), then Gemma's <end_of_turn> when the vocabulary has it."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    tokens = meta.get("tokenizer.ggml.tokens")
    if meta.get("general.architecture") == "gemma3" and isinstance(tokens, list) and "<end_of_turn>" in tokens:
        eot = tokens.index("<end_of_turn>")
        if eot not in ids:
            ids.append(eot)
    return ids


def load_gguf_spec(path: str | Path, name: str, weights: str = "auto", max_context: int | None = None,
                   meta: tuple[dict[str, Any], list[str]] | None = None) -> dict[str, Any]:
    """The engine spec of a GGUF model file (weights stay in the file's formats unless `weights` says otherwise)."""
    path = Path(path)
    if weights not in WEIGHT_FORMATS:
        raise UnsupportedModelError(f"weights: expected one of {', '.join(WEIGHT_FORMATS)}, found '{weights}'")
    md, tensor_names = meta if meta is not None else read_gguf_metadata(path)
    arch_name = md.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: metadata 'general.architecture': expected one of {', '.join(ARCHITECTURES)}, found {arch_name!r}"
        )
    arch = ARCHITECTURES[arch_name]
    a = arch_name
    dim = _get(md, path, f"{a}.embedding_length", int)
    n_heads = _get(md, path, f"{a}.attention.head_count", int)
    n_kv = _get(md, path, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = _get(md, path, f"{a}.attention.key_length", int, dim // n_heads)
    n_layer = _get(md, path, f"{a}.block_count", int)
    tokens = md.get("tokenizer.ggml.tokens")
    n_vocab = _get(md, path, f"{a}.vocab_size", int, len(tokens) if isinstance(tokens, list) else None)
    theta = _get(md, path, f"{a}.rope.freq_base", float, 10000.0)
    scaling = md.get(f"{a}.rope.scaling.type", "none")
    inv_freq = _rope_inv_freq(head_dim, theta)
    if scaling == "linear":
        inv_freq = (inv_freq / np.float32(_get(md, path, f"{a}.rope.scaling.factor", float))).astype(np.float32)
    elif scaling != "none":
        raise UnsupportedModelError(f"{path}: metadata '{a}.rope.scaling.type': expected 'none' or 'linear', "
                                    f"found {scaling!r}")
    # A 'rope_freqs.weight' tensor (llama3 scaling: factors dividing inv_freq) is folded in by the
    # engine at load (engine/src/gguf_model.cpp gguf_apply_rope_freqs).
    n_ctx = _get(md, path, f"{a}.context_length", int, 2048)
    if max_context is not None:
        n_ctx = min(n_ctx, max_context)
    names = set(tensor_names)
    spec: dict[str, Any] = {
        "name": name,
        "arch": arch,
        "n_layer": n_layer,
        "dim": dim,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "ffn_dim": _get(md, path, f"{a}.feed_forward_length", int),
        "n_vocab": n_vocab,
        "n_ctx": n_ctx,
        "rms_eps": _get(md, path, f"{a}.attention.layer_norm_rms_epsilon", float, 1e-6),
        "tied": "output.weight" not in names,
        "qkv_bias": "blk.0.attn_q.bias" in names,
        "rope_inv_freq": [float(x) for x in inv_freq],
        "eos_ids": gguf_eos_ids(md),
        "files": [str(path)],
        "weights": weights,
    }
    if arch == "qwen3":
        spec["qk_norm"] = True
    elif arch == "gemma3":
        from engine.hf_config import _gemma3_fields  # the HF config's rules, fed the GGUF's numbers

        cfg = {
            "sliding_window": _get(md, path, f"{a}.attention.sliding_window", int, 4096),
            "query_pre_attn_scalar": float(head_dim),
            "rope_theta": theta,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None if scaling == "none" else {
                "rope_type": "linear", "factor": float(md[f"{a}.rope.scaling.factor"])},
            "final_logit_softcapping": md.get(f"{a}.final_logit_softcapping"),
        }
        spec.update(_gemma3_fields(cfg, path, n_layer, head_dim, dim))
        # llama.cpp's converter stores Gemma's norms as 1 + w already.
        spec["norm_weight_offset"] = 0.0
    return spec
