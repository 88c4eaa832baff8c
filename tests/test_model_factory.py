"""tools.model_factory writes folders that Hugging Face transformers loads as the real thing.

The factory is the ground every parity test stands on, so its output is checked
against outside truth: transformers loads every variant with no missing,
unexpected or mismatched weights and reads back exactly the values written; the
safetensors library reads our writer's files; the tokenizer round-trips any text;
the reference shapes have the published parameter counts.
"""

from __future__ import annotations

import json
import tracemalloc
import unicodedata
from pathlib import Path
from typing import Any

import hf_reference as ref
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from tokenizers import Tokenizer

from tools import model_factory as mf

ROPE3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}

# name -> make_model kwargs; together they cover every variant the engine supports.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama_untied_rope3_gqa4": {"arch": "llama", "hidden": 128, "n_heads": 8, "n_kv_heads": 2, "intermediate": 256,
                                "rope_scaling": ROPE3},
    "smol_tied_gqa1": {"arch": "llama", "hidden": 64, "n_heads": 4, "n_kv_heads": 4, "tie_embeddings": True,
                       "rope_theta": 100000.0},
    "qwen2_bias_tied_gqa3": {"arch": "qwen2", "hidden": 96, "n_heads": 6, "n_kv_heads": 2, "intermediate": 160,
                             "tie_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
    "llama_sharded3": {"arch": "llama", "shards": 3},
    "qwen2_sharded2_bf16": {"arch": "qwen2", "shards": 2, "dtype": "bfloat16"},
    "llama_f16": {"arch": "llama", "dtype": "float16"},
    "llama_bf16": {"arch": "llama", "dtype": "bfloat16", "tie_embeddings": True},
}

TEXTS = [
    "Hello world, this is a test.",
    "café crème brûlée — naïve résumé",
    "日本語のテキスト、東京。",
    "emoji 🙂🚀🦀 and ✨ mixed with ASCII",
    "Привет мир. Ελληνικά. 한국어 العربية",
    "  leading spaces\tand tabs\nand newlines\r\n",
    "numbers 12345 and e\u0301 (not NFC) vs \u00e9",
    "",
]


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("factory")
    return {name: mf.make_model(root / name, seed=7, init_std=0.2, **kw) for name, kw in VARIANTS.items()}


def _load_with_info(path: Path) -> tuple[Any, dict[str, Any]]:
    auto: Any = transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                       output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_loads_every_variant_with_all_weights_from_the_files(variant_dirs: dict[str, Path], name: str) -> None:
    kw = VARIANTS[name]
    path = variant_dirs[name]
    model, info = _load_with_info(path)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kw["arch"]]
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], f"{name}: HF reports {key}: {info[key]}"

    # Every tensor HF holds is exactly what the files hold (bf16/f16 upcast exactly).
    stored = mf.read_tensors(path)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tied = kw.get("tie_embeddings", False)
    assert ("lm_head.weight" in stored) == (not tied)
    for tname, values in stored.items():
        np.testing.assert_array_equal(state[tname], values, err_msg=f"{name}: {tname}")
    if tied:
        np.testing.assert_array_equal(state["lm_head.weight"], stored["model.embed_tokens.weight"])
    has_bias = any(k.endswith("q_proj.bias") for k in stored)
    assert has_bias == (kw["arch"] == "qwen2")

    # Norm weights sit around 1 (not exactly 1), so a skipped or misapplied norm shows.
    norm = stored["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.03

    # A forward pass gives finite, decisive logits over the whole vocabulary.
    logits = ref.hf_logits(path, [5, 80, 200, 3, 42])
    assert logits.shape == (mf.tokenizer_size(),) and np.isfinite(logits).all()
    assert logits.std() > 0.5, "logits are flat; greedy tests would hit near ties"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_json_has_the_fields_hf_and_the_hub_use(variant_dirs: dict[str, Path], name: str) -> None:
    kw = {"hidden": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate": 128, "tie_embeddings": False,
          "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "dtype": "float32", "rope_scaling": None, **VARIANTS[name]}
    cfg = json.loads((variant_dirs[name] / "config.json").read_text())
    expected = {
        "hidden_size": kw["hidden"], "intermediate_size": kw["intermediate"], "num_attention_heads": kw["n_heads"],
        "num_key_value_heads": kw["n_kv_heads"], "num_hidden_layers": 2, "rms_norm_eps": kw["rms_norm_eps"],
        "rope_theta": kw["rope_theta"], "rope_scaling": kw["rope_scaling"], "max_position_embeddings": 512,
        "tie_word_embeddings": kw["tie_embeddings"], "vocab_size": mf.tokenizer_size(), "bos_token_id": 0,
        "torch_dtype": kw["dtype"], "hidden_act": "silu",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    if kw["arch"] == "llama":
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
        assert cfg["attention_bias"] is False and cfg["head_dim"] == kw["hidden"] // kw["n_heads"]
        assert cfg["eos_token_id"] == [2, 0]
    else:  # as Qwen2's Hub config: no head_dim, the reader derives it
        assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
        assert "head_dim" not in cfg and cfg["use_sliding_window"] is False and cfg["eos_token_id"] == 2

    hf_cfg = transformers.AutoConfig.from_pretrained(variant_dirs[name])
    assert hf_cfg.hidden_size == kw["hidden"] and hf_cfg.num_key_value_heads == kw["n_kv_heads"]
    assert getattr(hf_cfg, "head_dim", kw["hidden"] // kw["n_heads"]) == kw["hidden"] // kw["n_heads"]

    gen = transformers.GenerationConfig.from_pretrained(variant_dirs[name])
    assert gen.bos_token_id == 0 and gen.eos_token_id == [2, 0]


def test_sharded_index_maps_every_tensor_to_an_existing_shard(variant_dirs: dict[str, Path]) -> None:
    path = variant_dirs["llama_sharded3"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        header, _ = mf.read_safetensors_header(path / shard)
        names = {k for k in header if k != "__metadata__"}
        assert names and names == {k for k, v in index["weight_map"].items() if v == shard}
        total += sum(h["data_offsets"][1] - h["data_offsets"][0] for k, h in header.items() if k != "__metadata__")
    assert index["metadata"]["total_size"] == total


def test_same_seed_gives_the_same_values_in_every_storage_dtype_and_shard_count(tmp_path: Path) -> None:
    f32 = mf.read_tensors(mf.make_model(tmp_path / "a", seed=3))
    sharded = mf.read_tensors(mf.make_model(tmp_path / "b", seed=3, shards=4))
    f16 = mf.read_tensors(mf.make_model(tmp_path / "c", seed=3, dtype="float16"))
    bf16 = mf.read_tensors(mf.make_model(tmp_path / "d", seed=3, dtype="bfloat16"))
    other = mf.read_tensors(mf.make_model(tmp_path / "e", seed=4))
    assert f32.keys() == sharded.keys() == f16.keys() == bf16.keys()
    for name, x in f32.items():
        np.testing.assert_array_equal(sharded[name], x)
        np.testing.assert_array_equal(f16[name], x.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(bf16[name], ref.roundtrip(x, "bf16"))
        assert not np.array_equal(other[name], x), f"seed does not change {name}"
    np.testing.assert_array_equal(  # cross-check bf16 rounding against torch
        bf16["model.norm.weight"], torch.from_numpy(f32["model.norm.weight"]).bfloat16().float().numpy())


def test_llama3_rope_scaling_is_what_hf_applies(tmp_path: Path) -> None:
    """HF reads our rope_scaling as llama3 (its inv_freq matches the published formula),
    and the scaling changes the logits, so an engine ignoring it fails parity."""
    kw: dict[str, Any] = {"hidden": 64, "n_heads": 4, "n_kv_heads": 2, "seed": 5, "init_std": 0.2}
    scaled = mf.make_model(tmp_path / "scaled", rope_scaling=ROPE3, **kw)
    plain = mf.make_model(tmp_path / "plain", **kw)
    model = ref.load_hf_model(scaled)
    head_dim, theta = 16, 10000.0
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    low_wl, high_wl = 64 / 1.0, 64 / 4.0
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen > low_wl, inv / 8.0, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    expected = np.where(mid, (1 - smooth) * inv / 8.0 + smooth * inv, expected)
    assert mid.any() and (wavelen > low_wl).any() and (wavelen < high_wl).any(), "all three llama3 bands covered"
    np.testing.assert_allclose(model.model.rotary_emb.inv_freq.numpy(), expected, rtol=1e-6)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 400, 60)]
    assert ref.rel_error(ref.hf_logits(plain, ids), ref.hf_logits(scaled, ids)) > 1e-3


def test_vocab_larger_than_tokenizer_is_padded_and_smaller_is_refused(tmp_path: Path) -> None:
    path = mf.make_model(tmp_path / "pad", vocab=1000, tie_embeddings=True)
    assert mf.read_tensors(path)["model.embed_tokens.weight"].shape == (1000, 64)
    assert ref.hf_logits(path, [1, 2, 3]).shape == (1000,)
    with pytest.raises(ValueError, match="vocab=100 is smaller"):
        mf.make_model(tmp_path / "small", vocab=100)


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "mamba"}, "arch"),
    ({"dtype": "int8"}, "dtype"),
    ({"hidden": 64, "n_heads": 5}, "n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"shards": 1000}, "shards"),
])
def test_inconsistent_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mf.make_model(tmp_path / "m", **kwargs)


def test_safetensors_library_reads_our_writer(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], dtype=np.int64),
              "c": np.ones((2, 2, 2), dtype=np.float16), "empty": np.zeros((0, 3), dtype=np.float32)}
    mf.write_safetensors(tmp_path / "x.safetensors", arrays)
    back = safetensors.numpy.load_file(tmp_path / "x.safetensors")
    assert back.keys() == arrays.keys()
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype
    _, data_start = mf.read_safetensors_header(tmp_path / "x.safetensors")
    assert data_start % 8 == 0


def test_writing_streams_tensor_by_tensor_with_progress(tmp_path: Path) -> None:
    """A 134 MB (as f32) embedding is written with far less memory than the tensor itself."""
    calls: list[tuple[int, int, str]] = []
    tracemalloc.start()
    try:
        path = mf.make_model(tmp_path / "big", vocab=131072, hidden=256, n_heads=4, n_kv_heads=2, n_layers=1,
                             tie_embeddings=True, dtype="bfloat16", progress=lambda *a: calls.append(a))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MiB: the writer holds whole tensors"
    header, _ = mf.read_safetensors_header(path / "model.safetensors")
    n = len(header) - 1
    assert [c[:2] for c in calls] == [(i, n) for i in range(1, n + 1)]
    assert calls[0][2] == "model.embed_tokens.weight"
    assert header["model.embed_tokens.weight"]["shape"] == [131072, 256]


def test_tokenizer_is_byte_level_bpe_with_chatml_specials() -> None:
    tok = Tokenizer.from_str(mf.build_tokenizer_json())
    n = tok.get_vocab_size(with_added_tokens=True)
    assert 256 + 3 <= n <= 512 + 3
    assert [tok.token_to_id(s) for s in mf.SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.encode("<|im_start|>user").ids[0] == 1
    assert mf.build_tokenizer_json() is mf.build_tokenizer_json(), "built once per process"
    # byte-level: a 4-byte emoji is split over several tokens, none of them a whole character
    ids = tok.encode("🦀").ids
    assert len(ids) > 1 and all("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("variant", ["smol_tied_gqa1", "qwen2_bias_tied_gqa3"])
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_any_text_in_hf(variant_dirs: dict[str, Path], variant: str, text: str) -> None:
    """HF (which, for qwen2, rebuilds Qwen2's own pipeline around our vocabulary) and the
    tokenizers library on our tokenizer.json give the same ids; llama round-trips exactly,
    qwen2 up to its NFC normalizer."""
    hf_tok = ref.hf_tokenizer(variant_dirs[variant])
    ids = hf_tok.encode(text, add_special_tokens=False)
    expected = unicodedata.normalize("NFC", text) if variant.startswith("qwen2") else text
    assert hf_tok.decode(ids) == expected
    assert all(0 <= i < mf.tokenizer_size() for i in ids)
    raw = Tokenizer.from_file(str(variant_dirs[variant] / "tokenizer.json"))
    assert raw.encode(text).ids == ids


def test_chat_template_renders_chatml_in_hf(variant_dirs: dict[str, Path]) -> None:
    hf_tok = ref.hf_tokenizer(variant_dirs["qwen2_bias_tied_gqa3"])
    msgs = [{"role": "user", "content": "Bonjour, ça va? 🙂"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
        "<|im_start|>user\nBonjour, ça va? 🙂<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.bos_token == "<|endoftext|>"


def _shapes_from_meta_model(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the HF model a config describes, built on the meta device (no memory)."""
    cfg = transformers.AutoConfig.for_model(**config)
    auto: Any = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


PUBLISHED_PARAMS = {"smollm2-360m": 361_821_120, "qwen2-0.5b": 494_032_768, "llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("preset", list(mf.REFERENCE_SHAPES) + list(mf.DEMO_MODELS))
def test_presets_describe_the_model_hf_builds(preset: str) -> None:
    kw = {**mf.REFERENCE_SHAPES, **mf.DEMO_MODELS}[preset]
    spec_kw = {k: kw.get(k, d) for k, d in {"arch": "llama", "hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                 "intermediate": 128, "tie_embeddings": False}.items()}
    vocab = kw.get("vocab", mf.tokenizer_size())
    specs = mf.model_tensor_specs(vocab=vocab, **spec_kw)
    config = mf.hf_config_dict(
        vocab=vocab, rope_theta=kw.get("rope_theta", 10000.0), rope_scaling=kw.get("rope_scaling"),
        max_position_embeddings=kw.get("max_position_embeddings", 512), rms_norm_eps=kw.get("rms_norm_eps", 1e-5),
        dtype="bfloat16", init_std=0.02, **spec_kw)
    assert {s.name: s.shape for s in specs} == _shapes_from_meta_model(config)
    if preset in PUBLISHED_PARAMS:
        assert sum(int(np.prod(s.shape)) for s in specs) == PUBLISHED_PARAMS[preset]


def test_cli_writes_every_demo_model_and_hf_generates_from_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert mf.main([str(tmp_path), "--all-demos", "--progress-every", "8"]) == 0
    err = capsys.readouterr().err
    assert "tensors written" in err
    archs = set()
    for name in mf.DEMO_MODELS:
        path = tmp_path / name
        archs.add(json.loads((path / "config.json").read_text())["architectures"][0])
        run = ref.hf_greedy(path, [1, 20, 30, 40], 8)
        assert len(run.tokens) == 8 and float(run.margins.max()) > 0.01
    assert archs == {"LlamaForCausalLM", "Qwen2ForCausalLM"}
