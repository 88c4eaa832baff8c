"""Small random-weight Hugging Face model folders, written without torch.

Owner: tests and benchmarks (helper; the engine never imports it). Thread-safety:
``make_model`` writes only into its own ``out_dir``; the tokenizer cache is a
read-only string once built, so concurrent calls on different folders are safe.

A folder holds what ``transformers`` writes for ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``Gemma3ForCausalLM`` (text) as found on
the Hub (config.json in the Hub's legacy spelling:
``rope_theta`` + ``rope_scaling`` and ``torch_dtype``), a real byte-level BPE
tokenizer trained on a built-in corpus (480 ids, specials 0..2; the pipeline around
it is the arch's own, as transformers 5 insists), a ChatML chat template, and weights in
safetensors (single file or sharded with an index). Weights are deterministic:
tensor ``name`` is drawn from ``numpy.random.default_rng([seed, crc32(name)])``
in fixed-size chunks, so the same seed gives the same values whatever the
storage dtype (f16/bf16 are the f32 values rounded to nearest even) or the
number of shards. Tensors are generated and written one chunk at a time, so
the reference shapes (GBs) never sit in memory.

CLI (benchmarks, demo)::

    python -m tools.model_factory OUT_DIR --preset smollm2-360m --dtype bfloat16
    python -m tools.model_factory OUT_DIR --all-demos        # OUT_DIR/<name> for each DEMO_MODELS entry
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_MODELS",
    "REFERENCE_SHAPES",
    "SPECIAL_TOKENS",
    "ProgressFn",
    "TensorSpec",
    "build_tokenizer_json",
    "hf_config_dict",
    "make_model",
    "model_tensor_specs",
    "read_safetensors_header",
    "read_tensors",
    "tokenizer_size",
    "write_safetensors",
    "write_safetensors_stream",
]

# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

# Shapes of the three reference models (weights random): for benchmarks of
# memory, residency and throughput, never for quality.
REFERENCE_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-360m": {
        "arch": "llama", "hidden": 960, "n_layers": 32, "n_heads": 15, "n_kv_heads": 5, "intermediate": 2560,
        "vocab": 49152,
        "tie_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    },
    "qwen2-0.5b": {
        "arch": "qwen2", "hidden": 896, "n_layers": 24, "n_heads": 14, "n_kv_heads": 2, "intermediate": 4864,
        "vocab": 151936,
        "tie_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    },
    "llama-3.2-1b": {
        "arch": "llama", "hidden": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "intermediate": 8192,
        "vocab": 128256,
        "tie_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
    },
}

# Three tiny but not trivial models, one per architecture variant, for the demo:
# they generate fast on a CPU and exercise GQA, tied/untied heads, qkv bias and
# llama3 RoPE scaling. init_std is large enough that greedy choices are decisive.
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "smol-tiny": {  # SmolLM2-like: llama, tied embeddings, GQA 3:1
        "arch": "llama", "hidden": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "intermediate": 512,
        "tie_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 2048, "init_std": 0.1, "seed": 1,
    },
    "qwen-tiny": {  # Qwen2-like: q/k/v biases, tied embeddings, GQA 7:1
        "arch": "qwen2", "hidden": 224, "n_layers": 4, "n_heads": 7, "n_kv_heads": 1, "intermediate": 608,
        "tie_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "init_std": 0.1, "seed": 2,
    },
    "llama-tiny": {  # Llama-3.2-like: untied head, llama3 RoPE scaling, GQA 4:1
        "arch": "llama", "hidden": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "intermediate": 768,
        "tie_embeddings": False, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
        "max_position_embeddings": 4096, "init_std": 0.1, "seed": 3,
    },
}

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# Ids 0, 1, 2 in this order (SmolLM2's layout). bos = <|endoftext|>, eos = <|im_end|>.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
BOS_ID, EOS_ID = 0, 2

# ChatML, with SmolLM2's default system message when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mostly English so merges form real words; é/ï/ü occur often enough to merge
# into 2-byte tokens, while CJK and emoji stay split across byte tokens.
_CORPUS_EN = """\
The quick brown fox jumps over the lazy dog. A small model runs on an old machine, and
the engine streams its layers through memory one after another. Every request waits in
a queue until the worker has room for it; then the scheduler plans the next step, the
kernels compute the attention and the feed forward network, and the sampler picks the
next token. When the cache is full, a sequence is paused and its blocks are returned.
Producers send prompts, workers answer with tokens, and nothing is lost when a process
dies, because the state lives in the stream. This is a test of the tokenizer with some
words and more words, numbers like 12, 256, 1024 and 2048, and punctuation: commas,
periods; colons! question marks? quotes "like this" and 'that', (brackets) [too].
Hello world. How are you today? I am fine, thank you. What is the weather like?
It is sunny and warm in the morning, cold and windy in the evening.
def forward(self, x): return self.norm(x + self.attention(x))
"""
_CORPUS_INTL = """\
café crème brûlée naïve résumé déjà vu fiancée élève été Noël über Müller Zürich
Le café est très bon. Un élève a été à Zürich pour Noël. La fiancée a préparé une crème brûlée.
日本 日本語 東京 こんにちは 世界 ありがとう 日本の東京
emoji: 🙂 🚀 🦀 ✨ 👍 — and a dash – and ellipsis …
Привет мир. Ελληνικά. العربية. עברית. 한국어.
"""


ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# Qwen2's pre-tokenizer split (its tokenizer.json; transformers 5 also imposes it on
# every qwen2 folder through Qwen2Tokenizer, whatever tokenizer.json says).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


@functools.cache
def build_tokenizer_json(arch: str = "llama") -> str:
    """The tokenizer.json text for arch (deterministic; built once per process and arch).

    A byte-level BPE: every byte is in the base alphabet, so any text encodes,
    and a multi-byte character may be split over several tokens. Vocabulary and
    merges are the same for every arch; the pipeline around them is the arch's
    own: llama gets SmolLM2's (GPT-2 byte-level split, no normalizer, exact
    round trip), qwen2 gets Qwen2's (NFC normalizer, its regex split, then
    byte-level), so decode(encode(text)) is NFC(text) there.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, found {arch!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (_CORPUS_EN * 3 + _CORPUS_INTL * 4).splitlines()
    tok.train_from_iterator(corpus, trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}"
    if arch in ("qwen2", "qwen3"):  # Qwen3 keeps Qwen2's tokenizer pipeline
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return str(tok.to_str())


def tokenizer_size() -> int:
    """Number of ids the built-in tokenizer can produce (specials included)."""
    from tokenizers import Tokenizer

    return int(Tokenizer.from_str(build_tokenizer_json()).get_vocab_size(with_added_tokens=True))


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

_ST_ELEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1}
_NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
             np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
             np.dtype("bool"): "BOOL"}
_STORAGE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # config dtype -> safetensors dtype

# (name, safetensors dtype, shape, chunks of raw little-endian data)
StreamEntry = tuple[str, str, Sequence[int], Iterable[bytes | np.ndarray]]


def _n_bytes(st_dtype: str, shape: Sequence[int]) -> int:
    return _ST_ELEM_BYTES[st_dtype] * int(np.prod(shape, dtype=np.int64))


def write_safetensors_stream(
    path: str | Path,
    entries: Sequence[StreamEntry],
    *,
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Write a safetensors file whose tensors arrive as chunks; returns the data size.

    The header is computed from (dtype, shape) alone, so each entry's chunks are
    consumed lazily, in order, one at a time. Contract: the chunks of an entry
    hold exactly ``prod(shape) * elem_bytes`` bytes (checked). Data are laid out
    contiguously in entry order; the header is space-padded so the data section
    starts 8-byte aligned (as the reference implementation does).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
    offset = 0
    for name, st_dtype, shape, _ in entries:
        n = _n_bytes(st_dtype, shape)
        header[name] = {"dtype": st_dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, st_dtype, shape, chunks in entries:
            written = 0
            for chunk in chunks:
                buf = (np.ascontiguousarray(chunk).reshape(-1).view(np.uint8) if isinstance(chunk, np.ndarray)
                       else np.frombuffer(chunk, dtype=np.uint8))
                f.write(buf)  # type: ignore[arg-type]  # ndarray exports the buffer protocol
                written += buf.nbytes
            expected = _n_bytes(st_dtype, shape)
            if written != expected:
                raise ValueError(f"tensor {name!r}: chunks held {written} bytes, expected {expected}")
            if on_tensor is not None:
                on_tensor(name)
    return offset


def write_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write numpy arrays (f64/f32/f16/int/bool dtypes) as a safetensors file.

    bf16 has no numpy dtype: pass a ``(uint16 bits array, "BF16")`` through
    ``write_safetensors_stream`` instead.
    """
    entries: list[StreamEntry] = []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        if a.dtype not in _NP_TO_ST:
            raise ValueError(f"tensor {name!r}: numpy dtype {a.dtype} has no safetensors spelling here")
        entries.append((name, _NP_TO_ST[a.dtype], a.shape, [a]))
    write_safetensors_stream(path, entries, metadata=metadata)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset of the data section) of a well-formed file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def read_tensors(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a factory folder (single or sharded) as float32 arrays."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out: dict[str, np.ndarray] = {}
    for fname in files:
        header, start = read_safetensors_header(model_dir / fname)
        data = np.memmap(model_dir / fname, dtype=np.uint8, mode="r")
        for name, h in header.items():
            if name == "__metadata__":
                continue
            b, e = h["data_offsets"]
            buf = np.asarray(data[start + b:start + e])
            if h["dtype"] == "F32":
                a = buf.view("<f4").astype(np.float32)
            elif h["dtype"] == "F16":
                a = buf.view("<f2").astype(np.float32)
            elif h["dtype"] == "BF16":
                a = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise ValueError(f"{fname}: tensor {name!r} has dtype {h['dtype']}, expected F32, F16 or BF16")
            out[name] = a.reshape(h["shape"])
    return out


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

_CHUNK_ELEMS = 1 << 22  # fixed: values depend on it, memory use is bounded by it


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One weight: its HF name, shape and how it is initialised.

    kind: "normal" ~ N(0, init_std); "norm" ~ 1 + 0.1 N(0, 1) (so a mistaken
    norm shows); "offset_norm" ~ 0.1 N(0, 1) (Gemma stores w of x * (1 + w));
    "bias" ~ N(0, init_std).
    """

    name: str
    shape: tuple[int, ...]
    kind: str


def model_tensor_specs(
    *, arch: str, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, intermediate: int, vocab: int,
    tie_embeddings: bool, head_dim: int | None = None,
) -> list[TensorSpec]:
    """The tensors of a Llama / Qwen2 / Qwen3 / Gemma3 ForCausalLM in file order.

    head_dim defaults to hidden / n_heads (Qwen3 and Gemma3 often set it apart)."""
    head_dim = hidden // n_heads if head_dim is None else head_dim
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    norm = "offset_norm" if arch == "gemma3" else "norm"
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs.append(TensorSpec(p + "input_layernorm.weight", (hidden,), norm))
        for proj, rows in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            specs.append(TensorSpec(p + f"self_attn.{proj}.weight", (rows, hidden), "normal"))
            if arch == "qwen2":
                specs.append(TensorSpec(p + f"self_attn.{proj}.bias", (rows,), "bias"))
        if arch in ("qwen3", "gemma3"):
            specs.append(TensorSpec(p + "self_attn.q_norm.weight", (head_dim,), norm))
            specs.append(TensorSpec(p + "self_attn.k_norm.weight", (head_dim,), norm))
        specs.append(TensorSpec(p + "self_attn.o_proj.weight", (hidden, q_dim), "normal"))
        specs.append(TensorSpec(p + "post_attention_layernorm.weight", (hidden,), norm))
        if arch == "gemma3":
            specs.append(TensorSpec(p + "pre_feedforward_layernorm.weight", (hidden,), norm))
        specs.append(TensorSpec(p + "mlp.gate_proj.weight", (intermediate, hidden), "normal"))
        specs.append(TensorSpec(p + "mlp.up_proj.weight", (intermediate, hidden), "normal"))
        specs.append(TensorSpec(p + "mlp.down_proj.weight", (hidden, intermediate), "normal"))
        if arch == "gemma3":
            specs.append(TensorSpec(p + "post_feedforward_layernorm.weight", (hidden,), norm))
    specs.append(TensorSpec("model.norm.weight", (hidden,), norm))
    if not tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "normal"))
    return specs


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bits of float32 values, round to nearest even (inputs are finite)."""
    u = x.astype(np.float32, copy=False).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")


def _tensor_chunks(spec: TensorSpec, *, seed: int, init_std: float, st_dtype: str) -> Iterator[np.ndarray]:
    """The tensor's values, encoded for storage, in chunks of at most _CHUNK_ELEMS."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    n = int(np.prod(spec.shape, dtype=np.int64))
    for start in range(0, n, _CHUNK_ELEMS):
        x = rng.standard_normal(min(_CHUNK_ELEMS, n - start), dtype=np.float32)
        if spec.kind == "norm":
            x = np.float32(1.0) + np.float32(0.1) * x
        elif spec.kind == "offset_norm":
            x = np.float32(0.1) * x
        else:
            x *= np.float32(init_std)
        if st_dtype == "F32":
            yield x.astype("<f4", copy=False)
        elif st_dtype == "F16":
            yield x.astype("<f2")
        else:
            yield _f32_to_bf16_bits(x)


def _split_shards(specs: Sequence[TensorSpec], sizes: Sequence[int], n_shards: int) -> list[list[int]]:
    """Contiguous groups of tensor indices, n_shards of them, balanced by bytes, none empty."""
    if n_shards > len(specs):
        raise ValueError(f"shards={n_shards} but the model has only {len(specs)} tensors")
    target = sum(sizes) / n_shards
    groups: list[list[int]] = [[]]
    acc = 0
    for i, size in enumerate(sizes):
        to_open = n_shards - len(groups)
        if groups[-1] and to_open > 0 and (acc >= target or len(sizes) - i == to_open):
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += size
    assert len(groups) == n_shards
    return groups


# (tensors written so far, total tensors, name of the tensor just written)
ProgressFn = Callable[[int, int, str], None]


def hf_config_dict(
    *, arch: str, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, intermediate: int, vocab: int,
    tie_embeddings: bool, rope_theta: float, rope_scaling: Mapping[str, Any] | None, max_position_embeddings: int,
    rms_norm_eps: float, dtype: str, init_std: float, head_dim: int | None = None,
    sliding_window: int | None = None, sliding_window_pattern: int = 6, rope_local_base_freq: float = 10000.0,
    query_pre_attn_scalar: float | None = None, final_logit_softcapping: float | None = None,
) -> dict[str, Any]:
    """config.json as the Hub writes it for Llama / Qwen2 / Qwen3 / Gemma3 (text) ForCausalLM.

    Gemma3 only: sliding_window (default 4096, transformers' default) on every layer but
    each sliding_window_pattern-th, written out as layer_types (as gemma-3-270m's config);
    rope_local_base_freq for those layers; query_pre_attn_scalar (default head_dim)."""
    head_dim = hidden // n_heads if head_dim is None else head_dim
    common: dict[str, Any] = {
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": init_std,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": dict(rope_scaling) if rope_scaling is not None else None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": dtype,
        "transformers_version": "4.45.0",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if arch == "llama":  # as Llama-3.2-1B's config.json: head_dim present, eos a list
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "eos_token_id": [EOS_ID, BOS_ID], "head_dim": head_dim, "mlp_bias": False,
                "pretraining_tp": 1, **common}
    if arch == "qwen3":  # as Qwen3-0.6B's config.json: head_dim set apart, no biases, sliding window off
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                "eos_token_id": EOS_ID, "head_dim": head_dim, "max_window_layers": n_layers,
                "sliding_window": None, "use_sliding_window": False, **common}
    if arch == "gemma3":  # as gemma-3-270m's config.json (text-only Gemma3ForCausalLM)
        window = 4096 if sliding_window is None else sliding_window
        gemma = {k: v for k, v in common.items() if k not in ("hidden_act",)}
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
                "attn_logit_softcapping": None, "eos_token_id": EOS_ID, "pad_token_id": BOS_ID,
                "final_logit_softcapping": final_logit_softcapping, "head_dim": head_dim,
                "hidden_activation": "gelu_pytorch_tanh",
                "layer_types": ["sliding_attention" if (i + 1) % sliding_window_pattern else "full_attention"
                                for i in range(n_layers)],
                "query_pre_attn_scalar": head_dim if query_pre_attn_scalar is None else query_pre_attn_scalar,
                "rope_local_base_freq": rope_local_base_freq, "sliding_window": window,
                "use_bidirectional_attention": False, **gemma}
    # as Qwen2-0.5B's config.json: no head_dim (derived), eos an int, sliding window off
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "eos_token_id": EOS_ID,
            "max_window_layers": n_layers, "sliding_window": max_position_embeddings, "use_sliding_window": False,
            **common}


def _tokenizer_config_json(arch: str, max_position_embeddings: int) -> dict[str, Any]:
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in enumerate(SPECIAL_TOKENS)}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [s for s in SPECIAL_TOKENS if s not in (BOS_TOKEN, EOS_TOKEN)],
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": max_position_embeddings,
        "pad_token": BOS_TOKEN,
        # as on the Hub: SmolLM2 says GPT2Tokenizer, Qwen2 / Qwen3 Qwen2Tokenizer; Gemma's own class
        # would impose its SentencePiece pipeline on this byte-level BPE, so gemma3 folders name
        # the generic fast tokenizer (tokenizer.json as written)
        "tokenizer_class": {"llama": "GPT2Tokenizer", "gemma3": "PreTrainedTokenizerFast"}.get(arch, "Qwen2Tokenizer"),
        "unk_token": None,
    }


def make_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    hidden: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int | None = None,
    tie_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int = 512,
    rms_norm_eps: float = 1e-5,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    init_std: float = 0.02,
    progress: ProgressFn | None = None,
    head_dim: int | None = None,
    sliding_window: int | None = None,
    sliding_window_pattern: int = 6,
    rope_local_base_freq: float = 10000.0,
    query_pre_attn_scalar: float | None = None,
    final_logit_softcapping: float | None = None,
) -> Path:
    """Write a random-weight HF model folder into out_dir (created if needed); returns it.

    vocab defaults to the tokenizer's size; a larger vocab pads the embedding
    with ids the tokenizer never produces; a smaller one is an error. dtype is
    the storage dtype of every tensor ("float32" | "float16" | "bfloat16").
    shards > 1 writes model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json. progress(done, total, name) is called after
    each tensor. Raises ValueError on inconsistent arguments.

    head_dim (default hidden / n_heads) may be set apart from hidden (qwen3, gemma3). The
    gemma3-only arguments (window, pattern, local RoPE base, query scalar, final soft-cap)
    are described at hf_config_dict.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, found {arch!r}")
    if dtype not in _STORAGE:
        raise ValueError(f"dtype: expected one of {sorted(_STORAGE)}, found {dtype!r}")
    if min(hidden, n_layers, n_heads, n_kv_heads, intermediate, shards) < 1:
        raise ValueError("hidden, n_layers, n_heads, n_kv_heads, intermediate and shards must be >= 1")
    if (head_dim is None and hidden % n_heads) or n_heads % n_kv_heads:
        raise ValueError(f"need hidden % n_heads == 0 and n_heads % n_kv_heads == 0 "
                         f"(hidden={hidden}, n_heads={n_heads}, n_kv_heads={n_kv_heads})")
    hd = hidden // n_heads if head_dim is None else head_dim
    if hd < 2 or hd % 2:
        raise ValueError(f"head_dim = {hd} must be even for RoPE")
    n_tok = tokenizer_size()
    vocab = n_tok if vocab is None else vocab
    if vocab < n_tok:
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer's {n_tok} ids")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(
        arch=arch, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        intermediate=intermediate, vocab=vocab, tie_embeddings=tie_embeddings, rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps,
        dtype=dtype, init_std=init_std, head_dim=head_dim, sliding_window=sliding_window,
        sliding_window_pattern=sliding_window_pattern, rope_local_base_freq=rope_local_base_freq,
        query_pre_attn_scalar=query_pre_attn_scalar, final_logit_softcapping=final_logit_softcapping)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, BOS_ID], "transformers_version": "4.45.0"})
    (out / "tokenizer.json").write_text(build_tokenizer_json(arch), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config_json(arch, max_position_embeddings))
    _write_json(out / "special_tokens_map.json",
                {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": BOS_TOKEN,
                 "additional_special_tokens": [s for s in SPECIAL_TOKENS if s not in (BOS_TOKEN, EOS_TOKEN)]})

    st_dtype = _STORAGE[dtype]
    specs = model_tensor_specs(arch=arch, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                               intermediate=intermediate, vocab=vocab, tie_embeddings=tie_embeddings,
                               head_dim=head_dim)
    sizes = [_n_bytes(st_dtype, s.shape) for s in specs]
    groups = _split_shards(specs, sizes, shards)
    names = (["model.safetensors"] if shards == 1
             else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)])
    for stale in out.glob("model*.safetensors*"):  # a previous write with another shard count
        stale.unlink()

    n_done = 0

    def on_tensor(name: str) -> None:
        nonlocal n_done
        n_done += 1
        if progress is not None:
            progress(n_done, len(specs), name)

    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups):
        entries: list[StreamEntry] = [
            (specs[i].name, st_dtype, specs[i].shape,
             _tensor_chunks(specs[i], seed=seed, init_std=init_std, st_dtype=st_dtype)) for i in group]
        write_safetensors_stream(out / fname, entries, on_tensor=on_tensor)
        weight_map.update({specs[i].name: fname for i in group})
    if shards > 1:
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))})
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _stderr_progress(every: int) -> ProgressFn:
    def report(done: int, total: int, name: str) -> None:
        if done % every == 0 or done == total:
            print(f"  {done}/{total} tensors written ({name})", file=sys.stderr, flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    presets = {**REFERENCE_SHAPES, **DEMO_MODELS}
    ap = argparse.ArgumentParser(prog="python -m tools.model_factory",
                                 description="Write a random-weight Hugging Face model folder.")
    ap.add_argument("out_dir", type=Path)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=sorted(presets))
    group.add_argument("--all-demos", action="store_true", help="write every DEMO_MODELS entry into OUT_DIR/<name>")
    ap.add_argument("--dtype", choices=sorted(_STORAGE), default=None,
                    help="storage dtype (default: float32 for demos, bfloat16 for reference shapes)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--init-std", type=float, default=None)
    ap.add_argument("--progress-every", type=int, default=16, help="print progress every N tensors")
    args = ap.parse_args(argv)

    jobs = ([(args.out_dir / name, name) for name in DEMO_MODELS] if args.all_demos
            else [(args.out_dir, args.preset)])
    for out_dir, preset in jobs:
        kwargs = dict(presets[preset])
        kwargs["dtype"] = args.dtype or ("bfloat16" if preset in REFERENCE_SHAPES else "float32")
        kwargs["shards"] = args.shards
        if args.seed is not None:
            kwargs["seed"] = args.seed
        if args.init_std is not None:
            kwargs["init_std"] = args.init_std
        print(f"writing {preset} ({kwargs['dtype']}) to {out_dir}", file=sys.stderr, flush=True)
        make_model(out_dir, progress=_stderr_progress(max(1, args.progress_every)), **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
