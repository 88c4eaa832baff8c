"""Reads a Hugging Face model folder's config into the spec the C++ engine loads.

Owner: engine loaders. Pure functions; thread-safe.
Supported: LlamaForCausalLM (Llama 2/3/3.2, SmolLM2), MistralForCausalLM without a
sliding window, Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (QK-norm), and
Gemma3ForCausalLM (text: sandwich norms, QK-norm, GeGLU, scaled embedding, Gemma's
(1 + w) norms, interleaved sliding-window layers with their own RoPE base, query scale
from query_pre_attn_scalar, final logit soft-capping). Every error names the file and
the field, what was expected and what was found.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.errors import ModelFileError, UnsupportedModelError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}
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
    if kind is int and isinstance(value, int) and value <= 0:
        raise ModelFileError(f"{path}: field '{name}': expected a positive integer, found {value}")
    return value


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, path: Path) -> list[float]:
    """Inverse frequencies as transformers computes them (float32), llama3 scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = "default" if scaling is None else str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type == "default":
        return [float(x) for x in inv_freq]
    if rope_type == "linear":  # transformers: inv_freq / factor (Gemma 3's global layers)
        assert scaling is not None
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise ModelFileError(f"{path}: field 'rope_scaling.factor': expected a positive number, found {factor!r}")
        return [float(x) for x in (inv_freq / np.float32(factor)).astype(np.float32)]
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"{path}: field 'rope_scaling.rope_type': expected 'default', 'linear' or 'llama3', found '{rope_type}'"
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


def _gemma3_fields(cfg: dict[str, Any], path: Path, n_layer: int, head_dim: int, dim: int) -> dict[str, Any]:
    """The spec fields only Gemma 3 sets: norms, activation, scales, windows, the two RoPEs.

    The interleave comes from 'layer_types' when present, else from the older integer
    'sliding_window_pattern' (every pattern-th layer global, default 6), as transformers reads it.
    RoPE: 'rope_parameters' per layer type (transformers 5) or the Hub's flat spelling
    (rope_theta + rope_scaling for global layers, rope_local_base_freq for sliding ones).
    """
    act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"{path}: field 'hidden_activation': expected 'gelu_pytorch_tanh', found {act!r}")
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(f"{path}: field 'attn_logit_softcapping': attention soft-capping is not supported, "
                                    f"found {cfg.get('attn_logit_softcapping')!r}; expected null")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{path}: field 'use_bidirectional_attention': expected false (causal), found true")
    window = _field(cfg, path, "sliding_window", int, 4096)
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            raise ModelFileError(f"{path}: field 'sliding_window_pattern': expected a positive integer, found {pattern!r}")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    if (not isinstance(layer_types, list) or len(layer_types) != n_layer
            or any(t not in ("sliding_attention", "full_attention") for t in layer_types)):
        raise ModelFileError(f"{path}: field 'layer_types': expected {n_layer} entries of 'sliding_attention' or "
                             f"'full_attention', found {layer_types!r}")
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        full = dict(rope["full_attention"])
        local_rope = rope.get("sliding_attention")
        local: dict[str, Any] = local_rope if isinstance(local_rope, dict) else {}
        theta = float(full.get("rope_theta", 1_000_000.0))
        local_theta = float(local.get("rope_theta", 10_000.0))
        scaling: dict[str, Any] | None = full if full.get("rope_type", "default") != "default" else None
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{path}: field 'rope_parameters.sliding_attention.rope_type': expected "
                                        f"'default', found {local.get('rope_type')!r}")
    else:
        theta = _field(cfg, path, "rope_theta", float, 1_000_000.0)
        local_theta = _field(cfg, path, "rope_local_base_freq", float, 10_000.0)
        scaling = cfg.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ModelFileError(f"{path}: field 'rope_scaling': expected an object or null, found {scaling!r}")
    softcap = cfg.get("final_logit_softcapping")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or softcap <= 0):
        raise ModelFileError(f"{path}: field 'final_logit_softcapping': expected a positive number or null, "
                             f"found {softcap!r}")
    scalar = _field(cfg, path, "query_pre_attn_scalar", float, 256.0)
    if scalar <= 0:
        raise ModelFileError(f"{path}: field 'query_pre_attn_scalar': expected a positive number, found {scalar}")
    return {
        "qk_norm": True,
        "post_norms": True,
        "ffn_act": "gelu_tanh",
        "norm_weight_offset": 1.0,
        # transformers keeps sqrt(hidden) as a float32 tensor (in the weights' dtype: float32 here)
        "embed_scale": float(np.float32(math.sqrt(dim))),
        "attn_scale": float(scalar ** -0.5),
        "final_logit_softcap": float(softcap) if softcap is not None else 0.0,
        "layer_window": [window if t == "sliding_attention" else 0 for t in layer_types],
        "rope_inv_freq": rope_inv_freq(head_dim, theta, scaling, path),
        "rope_inv_freq_local": rope_inv_freq(head_dim, local_theta, None, path),
    }


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
    # Qwen3's config class defaults head_dim to 128, whatever hidden / heads is.
    head_dim = _field(cfg, path, "head_dim", int, 128 if arch == "qwen3" else dim // n_heads)
    act = cfg.get("hidden_act", "silu")
    if act != "silu" and arch != "gemma3":
        raise UnsupportedModelError(f"{path}: field 'hidden_act': expected 'silu', found {act!r}")
    if arch != "gemma3" and cfg.get("sliding_window") is not None and (
            arch_name == "MistralForCausalLM" or cfg.get("use_sliding_window")):
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
    n_layer = _field(cfg, path, "num_hidden_layers", int)
    qkv_bias = arch == "qwen2" or (arch in ("qwen3", "gemma3") and bool(cfg.get("attention_bias", False)))
    if qkv_bias and arch == "gemma3":
        raise UnsupportedModelError(f"{path}: field 'attention_bias': expected false for Gemma 3, found true")
    extra: dict[str, Any] = {}
    if arch == "qwen3":
        extra = {"qk_norm": True}
    elif arch == "gemma3":
        extra = _gemma3_fields(cfg, path, n_layer, head_dim, dim)
    spec: dict[str, Any] = {
        "name": name,
        "arch": arch,
        "n_layer": n_layer,
        "dim": dim,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "ffn_dim": _field(cfg, path, "intermediate_size", int),
        "n_vocab": _field(cfg, path, "vocab_size", int),
        "n_ctx": n_ctx,
        "rms_eps": _field(cfg, path, "rms_norm_eps", float, 1e-6),
        # Gemma 3's config class defaults to a tied head; the others to an untied one.
        "tied": bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
        "qkv_bias": qkv_bias,
        "rope_inv_freq": rope_inv_freq(head_dim, theta, scaling, path),
        "eos_ids": eos_token_ids(model_dir, cfg),
        "files": _safetensors_files(model_dir),
        "weights": weights,
    }
    spec.update(extra)
    return spec
