"""Loading GGUF files: the same model as a Hugging Face folder and as GGUF gives the same logits.

Files are written here with the gguf package's writer, as llama.cpp's converter lays them out:
llama names, ne reversed, and Llama's q/k rows permuted for interleaved RoPE (which the loader
must undo). Checks, each bitwise:
- f32 GGUF vs the f32 folder: names, shapes, the q/k un-permutation, tied and untied heads;
- q8_0 GGUF (quantised by the gguf package) vs the folder loaded with weights="q8_0";
- a GGUF mixing formats per tensor and per layer (q5_0 / q8_0 / q4_K / q6_K, as Q4_K_M does)
  vs an f32 GGUF holding the gguf package's dequantisation of the same blocks;
and that corrupt files fail with one line naming the file and the tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from engine.core import Engine, EngineConfig
from tools.model_factory import make_model, read_tensors

Q = gguf.GGMLQuantizationType
PROMPT = [1, 5, 9, 17, 33, 2, 7, 100, 3]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _write(path: Path, meta: dict[str, int | float], tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(int(meta["n_layer"]))
    w.add_context_length(512)
    w.add_embedding_length(int(meta["dim"]))
    w.add_feed_forward_length(int(meta["ffn"]))
    w.add_head_count(int(meta["n_heads"]))
    w.add_head_count_kv(int(meta["n_kv"]))
    w.add_rope_freq_base(float(meta["theta"]))
    w.add_layer_norm_rms_eps(float(meta["eps"]))
    w.add_vocab_size(int(meta["vocab"]))
    for name, (arr, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _from_folder(folder: Path, out: Path, kw: dict[str, int | float], quant: Q | None) -> Path:
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {}
    for hf, arr in read_tensors(folder).items():
        a = np.asarray(arr, dtype=np.float32)
        if hf.endswith("q_proj.weight"):
            a = _permute(a, int(kw["n_heads"]))
        elif hf.endswith("k_proj.weight"):
            a = _permute(a, int(kw["n_kv"]))
        if quant is not None and a.ndim == 2:
            tensors[_gguf_name(hf)] = (gguf.quants.quantize(a, quant), quant)
        else:
            tensors[_gguf_name(hf)] = (a, None)
    return _write(out, kw, tensors)


@pytest.fixture(scope="module")
def eng() -> Engine:
    with Engine(EngineConfig(budget_bytes=512 << 20)) as e:
        yield e  # type: ignore[misc]


@pytest.mark.parametrize("tied", [False, True])
def test_f32_and_q8_0_gguf_give_the_folders_logits_bitwise(tmp_path: Path, eng: Engine, tied: bool) -> None:
    kw = {"n_layer": 2, "dim": 128, "ffn": 256, "n_heads": 8, "n_kv": 2, "theta": 10000.0, "eps": 1e-5}
    folder = make_model(tmp_path / "hf", arch="llama", hidden=128, n_layers=2, n_heads=8, n_kv_heads=2,
                        intermediate=256, tie_embeddings=tied, seed=3)
    vocab = read_tensors(folder)["model.embed_tokens.weight"].shape[0]
    kw["vocab"] = vocab
    f32 = _from_folder(folder, tmp_path / "m-f32.gguf", kw, None)
    q8 = _from_folder(folder, tmp_path / "m-q8_0.gguf", kw, Q.Q8_0)
    tag = f"t{int(tied)}"
    eng.load_model(f"hf-{tag}", folder)
    eng.load_model(f"hfq8-{tag}", folder, weights="q8_0")
    info = eng.load_model(f"g32-{tag}", f32)
    assert info.n_vocab == vocab
    eng.load_model(f"gq8-{tag}", q8)
    want = eng.debug_logits(f"hf-{tag}", PROMPT)
    assert np.array_equal(eng.debug_logits(f"g32-{tag}", PROMPT), want)
    assert np.array_equal(eng.debug_logits(f"gq8-{tag}", PROMPT), eng.debug_logits(f"hfq8-{tag}", PROMPT))
    assert not np.array_equal(eng.debug_logits(f"gq8-{tag}", PROMPT), want)  # q8_0 really ran


def _random_quant(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks of qtype (finite f16 scales) and the gguf package's dequantisation of them."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    f16_at = {Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in f16_at:
        raw[:, off : off + 2] = (rng.standard_normal(n_blocks) * 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, qtype).astype(np.float32)


def test_per_tensor_formats_equal_an_f32_file_of_their_dequantised_values(tmp_path: Path, eng: Engine) -> None:
    # Q4_K_M's pattern: q/k q5_0, v q8_0 or q5_0 by layer, o q4_K, gate/up q5_0, down q6_K or q4_K by layer.
    dim, ffn, n_layer, vocab = 256, 512, 3, 300
    kw = {"n_layer": n_layer, "dim": dim, "ffn": ffn, "n_heads": 4, "n_kv": 2, "theta": 10000.0, "eps": 1e-6,
          "vocab": vocab}
    rng = np.random.default_rng(7)
    quant: dict[str, tuple[np.ndarray, Q | None]] = {}
    plain: dict[str, tuple[np.ndarray, Q | None]] = {}

    def mat(name: str, qtype: Q, rows: int, cols: int) -> None:
        raw, deq = _random_quant(rng, qtype, rows, cols)
        quant[name], plain[name] = (raw, qtype), (deq, None)

    def vec(name: str, n: int) -> None:
        v = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        quant[name] = plain[name] = (v, None)

    mat("token_embd.weight", Q.Q8_0, vocab, dim)
    vec("output_norm.weight", dim)
    for layer in range(n_layer):
        p = f"blk.{layer}."
        vec(p + "attn_norm.weight", dim)
        vec(p + "ffn_norm.weight", dim)
        mat(p + "attn_q.weight", Q.Q5_0, dim, dim)
        mat(p + "attn_k.weight", Q.Q5_0, dim // 2, dim)
        mat(p + "attn_v.weight", Q.Q8_0 if layer % 2 == 0 else Q.Q5_0, dim // 2, dim)
        mat(p + "attn_output.weight", Q.Q4_K, dim, dim)
        mat(p + "ffn_gate.weight", Q.Q5_0, ffn, dim)
        mat(p + "ffn_up.weight", Q.Q5_0, ffn, dim)
        mat(p + "ffn_down.weight", Q.Q6_K if layer != 1 else Q.Q4_K, dim, ffn)
    mixed = _write(tmp_path / "mixed.gguf", kw, quant)
    f32 = _write(tmp_path / "dequantised.gguf", kw, plain)
    info = eng.load_model("mixed", mixed)
    eng.load_model("deq", f32)
    assert np.array_equal(eng.debug_logits("mixed", PROMPT), eng.debug_logits("deq", PROMPT))
    # Each layer unit holds its own formats in one slot layout sized for the largest: q6_K's down
    # (210 bytes a block) books more than q4_K's (144); the ledger counts the real blocks.
    assert info.footprint.layer_bytes < eng.models()["deq"].footprint.layer_bytes


def test_corrupt_gguf_files_fail_with_one_line_naming_the_file_and_tensor(tmp_path: Path, eng: Engine) -> None:
    kw = {"n_layer": 1, "dim": 64, "ffn": 128, "n_heads": 4, "n_kv": 4, "theta": 10000.0, "eps": 1e-5, "vocab": 50}
    rng = np.random.default_rng(1)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {
        "token_embd.weight": (rng.standard_normal((50, 64)).astype(np.float32), None),
        "output_norm.weight": (np.ones(64, np.float32), None),
        "blk.0.attn_norm.weight": (np.ones(64, np.float32), None),
        "blk.0.ffn_norm.weight": (np.ones(64, np.float32), None),
    }
    for nm, shape in [("attn_q", (64, 64)), ("attn_k", (64, 64)), ("attn_v", (64, 64)), ("attn_output", (64, 64)),
                      ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)), ("ffn_down", (64, 128))]:
        tensors[f"blk.0.{nm}.weight"] = (rng.standard_normal(shape).astype(np.float32), None)
    good = _write(tmp_path / "good.gguf", kw, tensors)
    eng.load_model("good", good)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(Exception, match=r"cut\.gguf: tensor '[a-z_.0-9]+': data \[\d+, \d+\) ends past the end"):
        eng.load_model("cut", cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(Exception, match="bad magic"):
        eng.load_model("bad", bad)
    short = dict(tensors)
    short["blk.0.ffn_up.weight"] = (rng.standard_normal((100, 64)).astype(np.float32), None)
    wrong = _write(tmp_path / "wrong.gguf", kw, short)
    with pytest.raises(Exception, match=r"model.layers.0.mlp.up_proj.weight.*expected shape \[128, 64\], found \[100, 64\]"):
        eng.load_model("wrong", wrong)
