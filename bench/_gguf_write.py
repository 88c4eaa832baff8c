"""Writes a GGUF file from a random Llama/Qwen2 HF folder, with the `gguf` package only (no torch).

Owner: benchmarks. Runs in the llama venv (build/llama-venv: numpy + gguf from PyPI);
bench/llama_runner.py calls it. Single-threaded, one output file per call.

Why not llama.cpp's convert_hf_to_gguf.py. It is the reference path and was tried
first, but on our random folders it stops twice: (1) it needs torch==2.11 (its
requirements pin it; this project must not install a second torch), and (2) even with
torch at hand it rejects the tokenizer: our byte-level BPE tokenizer is trained on a
built-in corpus, so the hash of its encoding of the converter's check text matches no
known model and get_vocab_base_pre() raises NotImplementedError ("BPE pre-tokenizer was
not recognized"). The benchmarks feed token ids, never text, so this writer does the same
tensor work as the converter and writes the vocabulary with the neutral "default"
pre-tokenizer:

  - names: HF -> GGUF (model.layers.N.self_attn.q_proj -> blk.N.attn_q, ...);
  - llama only: Q and K rows permuted from HF's rotate-half layout to GGUF's interleaved
    one (convert_hf_to_gguf's LlamaModel.permute); qwen2 keeps HF's layout (NEOX RoPE);
  - llama3 RoPE scaling: a rope_freqs tensor with the per-dimension factors, as the
    converter computes them;
  - types as the converter's --outtype: 1-D tensors (norms, biases) stay f32, matrices
    become f16 / bf16 / q8_0 / q4_0 (gguf.quants.quantize), the embedding included
    (layermux's --weights q4_0 quantises the embedding the same way);
  - vocabulary: tokenizer model "gpt2", tokens and merges from tokenizer.json, ids the
    tokenizer never produces padded as [PADn] (UNUSED), bos/eos ids from the config.

bench/_llama_worker.py --check compares llama.cpp's greedy tokens on the result with
the HF ones, which is how this writer is known to be right.

    build/llama-venv/bin/python bench/_gguf_write.py MODEL_DIR OUT.gguf --outtype q8_0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise ValueError(f"unexpected tensor name {hf_name!r}")


def read_safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor, files in order; bf16 comes back as raw uint16 bits."""
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    np_types = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    for fname in files:
        path = model_dir / fname
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            yield name, data[begin:end].view(np_types[meta["dtype"]]).reshape(meta["shape"])


def to_f32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint16:  # bf16 bits
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> GGUF interleaved rows (convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray:
    rs = cfg["rope_scaling"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < hi_wavelen:
            out.append(1.0)
        elif wavelen > lo_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def encode(a: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The array as stored in the file and its raw type (None: numpy dtype says it)."""
    if a.ndim == 1 or outtype == "f32":
        return to_f32(a), None
    if outtype == "bf16":
        if a.dtype == np.uint16:  # already bf16 bits: copy them, no rounding twice
            return np.ascontiguousarray(a), gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(to_f32(a), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if outtype == "f16":
        return to_f32(a).astype(np.float16), None
    if outtype == "q8_0":
        return gguf.quants.quantize(to_f32(a), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if outtype == "q4_0":
        return gguf.quants.quantize(to_f32(a), gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0
    raise ValueError(f"outtype {outtype!r}")


def write_vocab(w: gguf.GGUFWriter, model_dir: Path, cfg: dict[str, Any]) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    by_id = {i: s for s, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    n_vocab = cfg["vocab_size"]
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in added and added[i].get("special") else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = cfg.get("bos_token_id", 0)
    eos = cfg.get("eos_token_id", 2)
    w.add_bos_token_id(int(bos))
    w.add_eos_token_id(int(eos[0] if isinstance(eos, list) else eos))
    w.add_add_bos_token(False)


def write_gguf(model_dir: Path, out: Path, outtype: str) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tmp = out.with_suffix(".gguf.part")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(_FILE_TYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, model_dir, cfg)

    rs = cfg.get("rope_scaling") or {}
    if arch == "llama" and rs.get("rope_type", rs.get("type")) == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    for n_done, (name, a) in enumerate(read_safetensors(model_dir), 1):
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            a = permute_rope(np.asarray(a), n_head)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            a = permute_rope(np.asarray(a), n_kv)
        data, raw = encode(np.asarray(a), outtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
        if n_done % 64 == 0:
            print(f"  {n_done} tensors encoded ({name})", file=sys.stderr, flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)


def main() -> int:
    ap = argparse.ArgumentParser(description="HF Llama/Qwen2 folder -> GGUF (f32/f16/bf16/q8_0/q4_0), gguf package only.")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", choices=sorted(_FILE_TYPES), default="f16")
    args = ap.parse_args()
    write_gguf(args.model_dir, args.out, args.outtype)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
