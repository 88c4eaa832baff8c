"""Loading GGUF files: the same model as a Hugging Face folder and as GGUF gives the same logits.

Files are written here with the gguf package's writer, as llama.cpp's converter lays them out:
llama names, ne reversed, and Llama's q/k rows permuted for interleaved RoPE (which the loader
must undo). Checks, each bitwise:
- f32 GGUF vs the f32 folder: names, shapes, the q/k un-permutation, tied and untied heads;
- q8_0 GGUF (quantised by the gguf package) vs the folder loaded with weights="q8_0";
- a GGUF mixing formats per tensor and per layer (q5_0 / q8_0 / q4_K / q6_K, as Q4_K_M does)
  vs an f32 GGUF holding the gguf package's dequantisation of the same blocks;
and that corrupt files fail with one line naming the file and the tensor. Llama 3 RoPE scaling
stored as llama.cpp stores it (a rope_freqs tensor of factors) gives the folder's logits and HF's
greedy tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from engine import LayermuxError, SamplingParams
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


def _from_folder(folder: Path, out: Path, kw: dict[str, int | float], quant: Q | None,
                 extra: dict[str, np.ndarray] | None = None) -> Path:
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {name: (a, None) for name, a in (extra or {}).items()}
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
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=512 << 20)) as e:
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


ROPE3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}


def _llama3_rope_factors(head_dim: int, theta: float, rs: dict[str, float | str]) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs.weight: per frequency, the number that divides it.

    The converter's formula (float64 per frequency, stored as f32): 1 for short wavelengths, `factor` for
    long ones, 1 / ((1 - smooth) / factor + smooth) between. One difference: the converter reads
    original_max_position_embeddings from the top level of config.json (default 8192, which is what
    every Llama 3.x config has under rope_scaling); transformers reads it from rope_scaling, and so does
    this (64 here, so that a tiny head_dim spans all three bands).
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_ctx = float(rs["original_max_position_embeddings"])
    out = []
    for f in inv:
        wavelen = 2 * np.pi / float(f)
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass
class Rope3Files:
    folder: Path  # HF folder, llama3 rope_scaling in config.json
    scaled: Path  # the same weights as GGUF with rope_freqs.weight
    plain: Path   # ... and without it
    prompt: list[int]


@pytest.fixture(scope="module")
def rope3(tmp_path_factory: pytest.TempPathFactory) -> Rope3Files:
    root = tmp_path_factory.mktemp("rope3")
    n_heads, head_dim, theta = 8, 16, 10000.0
    folder = make_model(root / "hf", arch="llama", hidden=128, n_layers=2, n_heads=n_heads, n_kv_heads=2,
                        intermediate=256, rope_theta=theta, rope_scaling=ROPE3, seed=1)
    kw: dict[str, int | float] = {"n_layer": 2, "dim": 128, "ffn": 256, "n_heads": n_heads, "n_kv": 2, "theta": theta,
                                  "eps": 1e-5, "vocab": read_tensors(folder)["model.embed_tokens.weight"].shape[0]}
    factors = _llama3_rope_factors(head_dim, theta, ROPE3)
    assert {1.0, 8.0} < set(factors.tolist()), factors  # all three bands: 1, 8 and smoothed ones between
    scaled = _from_folder(folder, root / "rope3.gguf", kw, None, extra={"rope_freqs.weight": factors})
    plain = _from_folder(folder, root / "plain.gguf", kw, None)
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 250, size=40)]
    return Rope3Files(folder, scaled, plain, prompt)


N_ROPE3 = 32  # after the 40-token prompt: positions up to 72, past the original context of 64


def test_llama3_rope_freqs_tensor_gives_the_folders_logits_and_hfs_greedy_tokens(rope3: Rope3Files,
                                                                                eng: Engine) -> None:
    import hf_reference as ref  # torch: only the rope tests need it

    eng.load_model("r3-hf", rope3.folder)
    eng.load_model("r3-gguf", rope3.scaled)
    eng.load_model("r3-plain", rope3.plain)
    hf = ref.hf_greedy(rope3.folder, rope3.prompt, N_ROPE3)
    params = SamplingParams(temperature=0.0, max_tokens=N_ROPE3, ignore_eos=True)
    assert eng.generate("r3-gguf", rope3.prompt, params) == hf.tokens == eng.generate("r3-hf", rope3.prompt, params)
    for k in (0, N_ROPE3 - 1):
        ids = rope3.prompt + hf.tokens[:k]
        got = eng.debug_logits("r3-gguf", ids)
        assert ref.rel_error(got, eng.debug_logits("r3-hf", ids)) <= 1e-5  # inv_freq / factor vs HF's blend: ulps
        assert ref.rel_error(got, hf.logits[k]) <= 1e-4
        assert ref.rel_error(eng.debug_logits("r3-plain", ids), hf.logits[k]) > 1e-3  # the factors matter


def test_llama3_rope_freqs_tensor_on_vulkan_gives_hfs_greedy_tokens(rope3: Rope3Files) -> None:
    """The Vulkan device builds its cos/sin tables on the host from the same (scaled) frequencies."""
    import hf_reference as ref

    try:
        vk = Engine(EngineConfig(kv_dtype="f32", budget_bytes=64 << 20, device_kind="vulkan"))
    except LayermuxError as e:
        pytest.skip(f"no Vulkan device: {e}")
    with vk:
        vk.load_model("r3-gguf", rope3.scaled)
        hf = ref.hf_greedy(rope3.folder, rope3.prompt, N_ROPE3)
        params = SamplingParams(temperature=0.0, max_tokens=N_ROPE3, ignore_eos=True)
        assert vk.generate("r3-gguf", rope3.prompt, params) == hf.tokens
        assert ref.rel_error(vk.debug_logits("r3-gguf", rope3.prompt), hf.logits[0]) <= 1e-4


def test_a_rope_freqs_tensor_of_the_wrong_shape_is_refused_naming_it(tmp_path: Path, eng: Engine) -> None:
    folder = make_model(tmp_path / "hf", arch="llama", hidden=64, n_layers=1, n_heads=4, n_kv_heads=2,
                        intermediate=128, seed=2)
    kw: dict[str, int | float] = {"n_layer": 1, "dim": 64, "ffn": 128, "n_heads": 4, "n_kv": 2, "theta": 10000.0,
                                  "eps": 1e-5, "vocab": read_tensors(folder)["model.embed_tokens.weight"].shape[0]}
    bad = _from_folder(folder, tmp_path / "bad.gguf", kw, None, extra={"rope_freqs.weight": np.ones(16, np.float32)})
    with pytest.raises(Exception, match=r"bad\.gguf \(tensor 'rope_freqs\.weight'\): expected f32 \[8\].*found f32 \[16\]"):
        eng.load_model("bad-rope", bad)
    zero = _from_folder(folder, tmp_path / "zero.gguf", kw, None, extra={"rope_freqs.weight": np.zeros(8, np.float32)})
    with pytest.raises(Exception, match=r"zero\.gguf \(tensor 'rope_freqs\.weight'\): factor 0: expected a finite positive"):
        eng.load_model("zero-rope", zero)
