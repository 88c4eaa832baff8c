"""Numerical truth from Hugging Face transformers (torch, CPU, float32, eager attention).

Owner: tests. Thread-safety: the model cache is a plain dict; use from one thread.
Every function takes a model folder (as written by tools.model_factory) or a
.gguf file (transformers dequantises it to float32: gguf_file=, needs accelerate) and
token ids, and returns numpy arrays, so tests compare engine and reference
without touching torch themselves. Generation never stops at EOS: it produces
exactly the number of tokens asked for.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from tools.model_factory import read_tensors, write_safetensors

_hf_logging: Any = transformers.utils.logging
_hf_logging.disable_progress_bar()
_hf_logging.set_verbosity_error()

_MODELS: dict[tuple[Any, ...], Any] = {}


def _cache_key(model_dir: Path) -> tuple[Any, ...]:
    """The folder and the identity of its files: a rewritten folder is reloaded."""
    files = [model_dir] if model_dir.is_file() else sorted(model_dir.iterdir())
    return (str(model_dir.resolve()),) + tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def load_hf_model(model_dir: str | Path) -> Any:
    """AutoModelForCausalLM in float32 with eager attention, eval mode (cached per folder state)."""
    model_dir = Path(model_dir)
    key = _cache_key(model_dir)
    model = _MODELS.get(key)
    if model is None:
        auto: Any = transformers.AutoModelForCausalLM
        if model_dir.suffix == ".gguf":
            model = auto.from_pretrained(model_dir.parent, gguf_file=model_dir.name, dtype=torch.float32,
                                         attn_implementation="eager")
        else:
            model = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        _MODELS[key] = model
    return model


def hf_tokenizer(model_dir: str | Path) -> Any:
    """The folder's (or .gguf file's) tokenizer as transformers loads it (AutoTokenizer)."""
    path = Path(model_dir)
    if path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def hf_logits_all(model_dir: str | Path, ids: list[int]) -> np.ndarray:
    """Logits at every position of one forward pass over ids: float32 [len(ids), n_vocab]."""
    assert ids, "need at least one token"
    model = load_hf_model(model_dir)
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    logits: np.ndarray = out.logits[0].to(torch.float32).numpy().copy()
    return logits


def hf_logits(model_dir: str | Path, ids: list[int]) -> np.ndarray:
    """Last-position logits after ids: float32 [n_vocab]."""
    last: np.ndarray = hf_logits_all(model_dir, ids)[-1]
    return last


@dataclasses.dataclass
class GreedyRun:
    """tokens[i] = argmax of logits[i]; margins[i] = top1 - top2 logit at step i
    (how decisive the choice was: a tiny margin means a near tie)."""

    tokens: list[int]
    logits: np.ndarray  # [n_tokens, n_vocab] float32, the row each token was chosen from
    margins: np.ndarray  # [n_tokens] float32


def _cache_kwarg(model: Any) -> str:
    """The forward() keyword for the KV cache: "cache" since transformers 5.x, "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_greedy(model_dir: str | Path, prompt_ids: list[int], n_tokens: int) -> GreedyRun:
    """Exactly n_tokens greedy tokens (EOS ignored), by a manual loop over a KV cache."""
    assert prompt_ids and n_tokens >= 1
    model = load_hf_model(model_dir)
    cache = transformers.DynamicCache(config=model.config)  # filled in place by each call
    cache_kw = _cache_kwarg(model)
    out = model(input_ids=torch.tensor([prompt_ids], dtype=torch.long), use_cache=True, **{cache_kw: cache})
    rows: list[np.ndarray] = []
    tokens: list[int] = []
    for step in range(n_tokens):
        row = out.logits[0, -1].to(torch.float32)
        tok = int(torch.argmax(row))  # first maximum: the lowest id wins a tie
        rows.append(row.numpy().copy())
        tokens.append(tok)
        if step + 1 < n_tokens:
            out = model(input_ids=torch.tensor([[tok]], dtype=torch.long), use_cache=True, **{cache_kw: cache})
    logits = np.stack(rows)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return GreedyRun(tokens=tokens, logits=logits, margins=(top2[:, 1] - top2[:, 0]).astype(np.float32))


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|: the error of a relative to the reference b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def teacher_forced_agreement(model_dir: str | Path, prompt_ids: list[int], tokens: list[int]) -> float:
    """Fraction of steps where the reference's argmax, given the same history, equals tokens[i].

    One forward pass over prompt + tokens: step i is predicted from
    prompt + tokens[:i], so one early disagreement does not poison the rest.
    """
    logits = hf_logits_all(model_dir, prompt_ids + tokens[:-1])
    predicted = np.argmax(logits[len(prompt_ids) - 1:], axis=1)
    return float(np.mean(predicted == np.asarray(tokens)))


# ---------------------------------------------------------------------------
# What the engine's load-time weight conversions do, simulated in numpy
# ---------------------------------------------------------------------------

def roundtrip(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 x -> fmt -> float32, as the engine converts matrices at load time.

    fmt: "f32" (identity), "f16", "bf16" (round to nearest even), "q8_0"
    (llama.cpp block_q8_0 along the last axis: blocks of 32 share
    d = max|x| / 127 stored as f16; q = round(x / d)), "q4_0" (llama.cpp
    block_q4_0: the value m of largest magnitude, sign kept, gives d = m / -8;
    nibble = min(15, trunc(x * (1/d) + 8.5)); value = f16(d) * (nibble - 8)).
    """
    x = np.asarray(x, dtype=np.float32)
    if fmt == "f32":
        return x.copy()
    if fmt == "f16":
        return x.astype(np.float16).astype(np.float32)
    if fmt == "bf16":
        u = x.view(np.uint32)
        bits = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if fmt == "q8_0":
        assert x.shape[-1] % 32 == 0, f"q8_0 needs rows that are a multiple of 32, found {x.shape}"
        blocks = x.reshape(-1, 32)
        d = np.max(np.abs(blocks), axis=1, keepdims=True) / np.float32(127.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d > 0, np.rint(blocks / np.where(d > 0, d, 1)), 0).astype(np.int8)
        d16 = d.astype(np.float16).astype(np.float32)
        dequantized: np.ndarray = (q.astype(np.float32) * d16).reshape(x.shape)
        return dequantized
    if fmt == "q4_0":
        assert x.shape[-1] % 32 == 0, f"q4_0 needs rows that are a multiple of 32, found {x.shape}"
        blocks = x.reshape(-1, 32)
        m = blocks[np.arange(len(blocks)), np.argmax(np.abs(blocks), axis=1)]  # first of the largest |x|
        d = (m / np.float32(-8.0)).astype(np.float32)[:, None]
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, 1), 0).astype(np.float32)
        t = (blocks * inv).astype(np.float32) + np.float32(8.5)  # two float32 roundings, as llama.cpp
        nib = np.minimum(15, np.trunc(t)).astype(np.float32)
        d16 = d.astype(np.float16).astype(np.float32)
        dequantized4: np.ndarray = ((nib - np.float32(8.0)) * d16).reshape(x.shape)
        return dequantized4
    raise ValueError(f"fmt: expected f32, f16, bf16, q8_0 or q4_0, found {fmt!r}")


def write_converted_model(src_dir: str | Path, dst_dir: str | Path, fmt: str) -> Path:
    """Copy a folder, replacing every matrix by roundtrip(matrix, fmt) stored as f32.

    Vectors (norms, biases) stay exact, as in the engine, which keeps them f32.
    HF on the result is what an engine running with weights=fmt should compute.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.safetensors*"))
    tensors = {name: (roundtrip(t, fmt) if t.ndim == 2 else t) for name, t in read_tensors(src).items()}
    write_safetensors(dst / "model.safetensors", tensors)
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
