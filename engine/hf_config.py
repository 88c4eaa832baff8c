"""Reads a Hugging Face model folder's config into the spec the C++ engine loads.

Owner: engine loaders. Pure functions; thread-safe.
Supported: LlamaForCausalLM (Llama 2/3/3.2, SmolLM2), MistralForCausalLM without a
sliding window, Qwen2ForCausalLM (q/k/v biases). Every error names the file and
the field, what was expected and what was found.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.errors import ModelFileError, UnsupportedModelError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
WEIGHT_FORMATS = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found; expected {what}")
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e}); expected {what}") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _field(cfg: dict[str, Any], path: Path, name: str, kind: type, default: Any = None) -> Any:
    value = cfg.get(name, default)
    if value is None:
        raise ModelFileError(f"{path}: field '{name}' is missing; expected {kind.__name__}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelFileError(f"{path}: field '{name}': expected {kind.__name__}, found {value!r}")
    if kind is int and value <= 0:
        raise ModelFileError(f"{path}: field '{name}': expected a positive integer, found {value}")
    return value


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, path: Path) -> list[float]:
    """Inverse frequencies as transformers computes them (float32), llama3 scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = "default" if scaling is None else str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type == "default":
        return [float(x) for x in inv_freq]
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"{path}: field 'rope_scaling.rope_type': expected 'default' or 'llama3', found '{rope_type}'"
        )
    assert scaling is not None
    try:
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(
            f"{path}: field 'rope_scaling': llama3 scaling needs factor, low_freq_factor, high_freq_factor and "
            f"original_max_position_embeddings; found {scaling!r}"
        ) from e
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    out = np.where(medium, smoothed, scaled).astype(np.float32)
    return [float(x) for x in out]


def _safetensors_files(model_dir: Path) -> list[str]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        idx = _read_json(index, "a safetensors index with a 'weight_map'")
        weight_map = idx.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: field 'weight_map': expected a non-empty object, found {weight_map!r}")
        shards = sorted({str(v) for v in weight_map.values()})
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise ModelFileError(f"{index}: names shard '{shard}', which is not in {model_dir}")
        return [str(model_dir / s) for s in shards]
    if single.is_file():
        return [str(single)]
    raise ModelFileError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json; expected Hugging Face safetensors weights"
    )


def eos_token_ids(model_dir: Path, cfg: dict[str, Any]) -> list[int]:
    """EOS ids from generation_config.json, falling back to config.json."""
    gen_path = model_dir / "generation_config.json"
    source: Any = None
    if gen_path.is_file():
        source = _read_json(gen_path, "generation settings").get("eos_token_id")
    if source is None:
        source = cfg.get("eos_token_id")
    if source is None:
        return []
    ids = source if isinstance(source, list) else [source]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ModelFileError(f"{gen_path}: field 'eos_token_id': expected an int or a list of ints, found {source!r}")
    return [int(i) for i in ids]


def load_spec(model_dir: str | Path, name: str, weights: str = "auto", max_context: int | None = None) -> dict[str, Any]:
    """The engine spec of a Hugging Face model folder (see engine/src/model.h ModelSpec), or of a .gguf file."""
    if str(model_dir).lower().endswith(".gguf"):
        from engine.gguf_config import load_gguf_spec  # local: gguf_config reuses this module's Gemma rules

        return load_gguf_spec(model_dir, name, weights, max_context)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir}: not a directory; expected a Hugging Face model folder")
    if weights not in WEIGHT_FORMATS:
        raise UnsupportedModelError(f"weights: expected one of {', '.join(WEIGHT_FORMATS)}, found '{weights}'")
    path = model_dir / "config.json"
    cfg = _read_json(path, "a Hugging Face config.json")
    archs = cfg.get("architectures")
    arch_name = archs[0] if isinstance(archs, list) and archs else None
    if arch_name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: field 'architectures': expected one of {', '.join(sorted(ARCHITECTURES))}, found {archs!r}"
        )
    arch = ARCHITECTURES[arch_name]
    dim = _field(cfg, path, "hidden_size", int)
    n_heads = _field(cfg, path, "num_attention_heads", int)
    n_kv = _field(cfg, path, "num_key_value_heads", int, n_heads)
    head_dim = _field(cfg, path, "head_dim", int, dim // n_heads)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{path}: field 'hidden_act': expected 'silu', found {act!r}")
    if cfg.get("sliding_window") is not None and (arch_name == "MistralForCausalLM" or cfg.get("use_sliding_window")):
        raise UnsupportedModelError(f"{path}: field 'sliding_window': sliding-window attention is not supported, found "
                                    f"{cfg.get('sliding_window')!r}")
    if arch == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UnsupportedModelError(f"{path}: fields 'attention_bias'/'mlp_bias': expected false for Llama, found true")
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None
    theta = float(rope.get("rope_theta", 10000.0)) if rope else _field(cfg, path, "rope_theta", float, 10000.0)
    scaling = cfg.get("rope_scaling")
    if rope is not None and rope.get("rope_type", "default") != "default":
        scaling = rope
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelFileError(f"{path}: field 'rope_scaling': expected an object or null, found {scaling!r}")
    n_ctx = _field(cfg, path, "max_position_embeddings", int, 2048)
    if max_context is not None:
        n_ctx = min(n_ctx, max_context)
    return {
        "name": name,
        "arch": arch,
        "n_layer": _field(cfg, path, "num_hidden_layers", int),
        "dim": dim,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "ffn_dim": _field(cfg, path, "intermediate_size", int),
        "n_vocab": _field(cfg, path, "vocab_size", int),
        "n_ctx": n_ctx,
        "rms_eps": _field(cfg, path, "rms_norm_eps", float, 1e-6),
        "tied": bool(cfg.get("tie_word_embeddings", False)),
        "qkv_bias": arch == "qwen2",
        "rope_inv_freq": rope_inv_freq(head_dim, theta, scaling, path),
        "eos_ids": eos_token_ids(model_dir, cfg),
        "files": _safetensors_files(model_dir),
        "weights": weights,
    }
