"""Gemma 3 and Qwen 3 beyond the shared parity suite: sliding windows, config spellings, streaming.

tests/test_parity.py runs every parity check on one Gemma 3 and one Qwen 3 variant. This
file covers what is particular to them, against HF transformers (float32, eager):
  * sliding-window layers with a window shorter than the prompt, in prefill chunks
    smaller than, equal to and larger than the window, in decode, and across the 16-token
    KV blocks; and that the window really changes the result (so the test can fail);
  * the config as the Hub writes it (layer_types, rope_local_base_freq) and as
    transformers 5 saves it (nested rope_parameters) give the same spec; the older
    sliding_window_pattern integer; a tied Gemma head;
  * what is not supported is refused with the field named;
  * streamed layers (residency="streamed") give the resident model's tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import hf_reference as ref
import numpy as np
import pytest

from engine import Engine, EngineConfig, EventKind, ModelLoadOptions, ResidencyMode, SamplingParams
from engine.errors import ModelFileError, UnsupportedModelError
from engine.hf_config import load_spec
from tools.model_factory import make_model, tokenizer_size

F32_TOL = 1e-4
INIT_STD = 0.2

GEMMA: dict[str, Any] = {"arch": "gemma3", "hidden": 64, "n_heads": 4, "n_kv_heads": 1, "head_dim": 32, "intermediate": 128,
         "n_layers": 3, "sliding_window": 5, "sliding_window_pattern": 2, "rope_theta": 1e6,
         "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-6, "seed": 3}
QWEN3: dict[str, Any] = {"arch": "qwen3", "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "intermediate": 128,
         "n_layers": 6, "rope_theta": 1e6, "seed": 3}


def prompt_ids(n: int, salt: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(2000 + 7 * salt + n).integers(3, tokenizer_size(), n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def with_config(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of folder src whose config.json has the given fields changed (None removes one)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {
        "gemma": make_model(root / "gemma", init_std=INIT_STD, **GEMMA),
        # a small init: larger ones make a tied Gemma repeat its input token (scaled embedding)
        "gemma_tied": make_model(root / "gemma_tied", init_std=0.02, tie_embeddings=True,
                                 **{**GEMMA, "sliding_window": 16, "seed": 6}),
        "qwen3": make_model(root / "qwen3", init_std=INIT_STD, **QWEN3),
    }


# ---------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------

def test_the_window_changes_the_logits_so_these_tests_can_fail(dirs: dict[str, Path], tmp_path: Path) -> None:
    """HF itself: the same weights with a window wider than the prompt give other logits."""
    wide = with_config(dirs["gemma"], tmp_path / "wide", sliding_window=4096)
    ids = prompt_ids(40)
    assert ref.rel_error(ref.hf_logits(wide, ids), ref.hf_logits(dirs["gemma"], ids)) > 100 * F32_TOL
    short = prompt_ids(5)  # inside the window: no difference
    assert ref.rel_error(ref.hf_logits(wide, short), ref.hf_logits(dirs["gemma"], short)) == 0.0


@pytest.mark.parametrize("chunk", [3, 5, 8, 16, 512])
def test_sliding_window_logits_match_hf_for_any_prefill_chunk(dirs: dict[str, Path], chunk: int) -> None:
    """Window 5 over 16-token KV blocks; prompts of 4 .. 45 tokens prefilled in chunks of `chunk`."""
    path = dirs["gemma"]
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=128 << 20, kv_block_tokens=16, max_batch_tokens=chunk)) as eng:
        eng.load_model("g", path)
        for n in (4, 5, 6, 16, 17, 33, 45):
            ids = prompt_ids(n)
            err = ref.rel_error(eng.debug_logits("g", ids), ref.hf_logits(path, ids))
            assert err <= F32_TOL, f"chunk {chunk}, prompt of {n}: relative error {err:.3g}"


@pytest.mark.parametrize("name", ["gemma", "gemma_tied", "qwen3"])
def test_decode_far_past_the_window_matches_hf_greedy_and_logits(dirs: dict[str, Path], name: str) -> None:
    """48 greedy steps from a 20-token prompt (window 5 or 16): every token equal, logits at two depths too."""
    path = dirs[name]
    prompt = prompt_ids(20, salt=1)
    run = ref.hf_greedy(path, prompt, 48)
    assert run.margins.min() >= 2e-3, "test setup: the reference has a near tie; pick another seed"
    assert len(set(run.tokens)) > 8, "test setup: the reference repeats itself; pick another seed"
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=128 << 20, kv_block_tokens=16)) as eng:
        eng.load_model("m", path)
        assert eng.generate("m", prompt, greedy(48)) == run.tokens
        for k in (20, 47):
            err = ref.rel_error(eng.debug_logits("m", prompt + run.tokens[:k]), run.logits[k])
            assert err <= F32_TOL, f"{name}: step {k}: relative error {err:.3g}"


def test_sequences_with_and_without_a_full_window_batch_invariantly(dirs: dict[str, Path]) -> None:
    """Prompts shorter and longer than the window, submitted together and alone: the same tokens."""
    path = dirs["gemma"]
    prompts = [prompt_ids(n, salt=2) for n in (2, 5, 6, 15, 16, 17, 40)]
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=128 << 20, kv_block_tokens=16)) as eng:
        eng.load_model("g", path)
        alone = [eng.generate("g", p, greedy(12)) for p in prompts]
        for i, p in enumerate(prompts):
            eng.submit(100 + i, "g", p, greedy(12))
        together: dict[int, list[int]] = {100 + i: [] for i in range(len(prompts))}
        open_ids = set(together)
        while open_ids:
            for ev in eng.wait_events(5.0):
                assert ev.kind != EventKind.error, ev.message
                if ev.kind == EventKind.token:
                    together[ev.req_id].append(ev.token_id)
                elif ev.kind == EventKind.done:
                    open_ids.discard(ev.req_id)
    assert [together[100 + i] for i in range(len(prompts))] == alone
    assert alone[-1] == ref.hf_greedy(path, prompts[-1], 12).tokens


# ---------------------------------------------------------------------------
# Streamed layers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma", "qwen3"])
def test_streamed_layers_generate_the_resident_tokens(dirs: dict[str, Path], name: str) -> None:
    path = dirs[name]
    prompts = [prompt_ids(n, salt=3) for n in (3, 17, 40)]

    def run(options: ModelLoadOptions) -> tuple[list[list[int]], bool, int, int]:
        """(tokens per prompt, resident?, weight bytes, bytes copied into layer slots)"""
        with Engine(EngineConfig(kv_dtype="f32", budget_bytes=64 << 20, kv_block_tokens=16, max_batch_tokens=8)) as eng:
            info = eng.load_model("m", path, options=options)
            out = [eng.generate("m", p, SamplingParams(temperature=0.8, top_k=40, seed=7 + i, max_tokens=24,
                                                       ignore_eos=True)) for i, p in enumerate(prompts)]
            return out, info.resident, info.weight_bytes, eng.stats().residency.bytes_copied

    resident, was_resident, weight_bytes, _ = run(ModelLoadOptions(residency=ResidencyMode.resident))
    streamed, was_streamed_resident, _, copied = run(ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2))
    assert was_resident and not was_streamed_resident
    assert copied > weight_bytes, "layers really streamed, more than once"
    assert streamed == resident


# ---------------------------------------------------------------------------
# Config spellings and refusals
# ---------------------------------------------------------------------------

def test_gemma3_spec_fields_follow_the_config(dirs: dict[str, Path]) -> None:
    spec = load_spec(dirs["gemma"], "g")
    assert spec["arch"] == "gemma3" and spec["qk_norm"] and spec["post_norms"]
    assert spec["ffn_act"] == "gelu_tanh" and spec["norm_weight_offset"] == 1.0
    assert spec["layer_window"] == [5, 0, 5]  # pattern 2: every second layer global
    assert spec["embed_scale"] == float(np.float32(math.sqrt(64)))
    assert spec["attn_scale"] == pytest.approx(24 ** -0.5)
    assert spec["final_logit_softcap"] == 0.0 and not spec["tied"]
    assert spec["rope_inv_freq"][1] == pytest.approx(1e6 ** (-2 / 32), rel=1e-6)
    assert spec["rope_inv_freq_local"][1] == pytest.approx(1e4 ** (-2 / 32), rel=1e-6)
    assert load_spec(dirs["gemma_tied"], "t")["tied"]
    q = load_spec(dirs["qwen3"], "q")
    assert q["arch"] == "qwen3" and q["qk_norm"] and not q["qkv_bias"] and q["head_dim"] == 16
    assert "layer_window" not in q and "post_norms" not in q


def test_config_saved_by_transformers_5_gives_the_same_spec(dirs: dict[str, Path], tmp_path: Path) -> None:
    """save_pretrained writes rope_parameters per layer type (and drops the flat fields): same spec."""
    for name in ("gemma", "qwen3"):
        out = tmp_path / name
        ref.load_hf_model(dirs[name]).save_pretrained(out)
        shutil.copy(dirs[name] / "generation_config.json", out / "generation_config.json")
        want, got = load_spec(dirs[name], "m"), load_spec(out, "m")
        want.pop("files"), got.pop("files")
        assert got == want, name


def test_sliding_window_pattern_integer_when_layer_types_is_absent(dirs: dict[str, Path], tmp_path: Path) -> None:
    old = with_config(dirs["gemma"], tmp_path / "old", layer_types=None, sliding_window_pattern=3)
    assert load_spec(old, "g")["layer_window"] == [5, 5, 0]
    ids = prompt_ids(30)
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=64 << 20)) as eng:
        eng.load_model("g", old)
        assert ref.rel_error(eng.debug_logits("g", ids), ref.hf_logits(old, ids)) <= F32_TOL


@pytest.mark.parametrize(("changes", "field"), [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "architectures"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
])
def test_unsupported_gemma3_configs_are_refused_naming_the_field(dirs: dict[str, Path], tmp_path: Path,
                                                                  changes: dict[str, Any], field: str) -> None:
    bad = with_config(dirs["gemma"], tmp_path / "bad", **changes)
    with pytest.raises((UnsupportedModelError, ModelFileError), match=field):
        load_spec(bad, "g")
