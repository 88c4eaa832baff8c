"""The engine on the Vulkan device computes what Hugging Face transformers computes.

Runs on any Vulkan 1.2 device; here that is Mesa's lavapipe (a conformant Vulkan device on the
CPU), so these tests say nothing about speed. Every engine of this module runs under
VK_LAYER_KHRONOS_validation with synchronization validation (LMX_VK_VALIDATION=1, set before the
first engine), and every test fails on any validation message. The module skips, with one line
saying why, where the engine was built without Vulkan or the machine has no Vulkan device.

Bounds (the CPU engine's, tests/test_parity.py; the comparisons with transformers and the 1e-5 one run
with f32 KV pages, the rest with the default, f16):
  * f32: greedy tokens identical to HF for 32 steps, last-position logits within 1e-4 relative;
  * f16 / bf16 / q8_0 / q4_0 conversion at load: logits against HF on the same weights rounded the
    engine's way within 1e-4 (f16, bf16) / 1e-3 (q8_0, q4_0) relative, and the Vulkan engine's greedy
    tokens equal to the CPU engine's on the same weights for 32 steps;
  * 8 sequences submitted together give, bit for bit, the tokens each gives alone;
  * a model streamed through 2 layer slots (<= 30 % of its weights on the device) gives the
    tokens of the resident model, and its layers were copied more than once;
  * KV pages in f16 (kv_dtype = "f16", two halves packed in a 32-bit word, rounded to nearest even as
    the CPU rounds them): greedy tokens equal to the CPU engine's with f16 KV for 32 steps on every
    architecture, last-position logits within KV_F16_VS_CPU_TOL relative (f32 accumulation order, and
    with it the odd K/V element rounded to the neighbouring half; measured worst 4e-5), half the KV bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hf_reference as ref
import numpy as np
import pytest
import redis

os.environ.setdefault("LMX_VK_VALIDATION", "1")
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

from test_parity import INIT_STD, VARIANTS

from engine import (
    Engine,
    EngineConfig,
    EngineEvent,
    ErrorCode,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
    _core,
)
from engine.errors import CapacityError, LayermuxError
from engine.text import Tokenizer
from producer_sdk.client import AsyncProducer
from producer_sdk.errors import WorkerFailureError
from producer_sdk.keys import Keys
from producer_sdk.protocol import decode_event
from tools.model_factory import make_model, tokenizer_size

# The random architectures are tests/test_parity.py's (same seeds, so HF's greedy margins are >= 2e-3).
# The worker, streaming and batching tests use these three (the reference case's architectures).
LLAMA_QWEN = ("llama_untied_rope3_gqa4", "smol_tied_gqa1", "qwen2_bias_gqa3")
MIN_MARGIN = 2e-3
N_GREEDY = 32
F32_TOL = 1e-4
CONVERSION_TOL = {"f16": 1e-4, "bf16": 1e-4, "q8_0": 1e-3, "q4_0": 1e-3}
BUDGET = 96 << 20
KV_F16_VS_CPU_TOL = 2e-4


def _probe() -> str | None:
    """None when a Vulkan engine can be made here, else the one-line reason."""
    try:
        with Engine(EngineConfig(budget_bytes=16 << 20, device_kind="vulkan")):
            return None
    except LayermuxError as e:
        return str(e)


_WHY = _probe()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no Vulkan device: {_WHY}")


def prompt_ids(n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(1000 + n).integers(3, tokenizer_size(), n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def validation_messages() -> int:
    """Messages of the validation layer so far in this process (the engine's debug messenger counts them)."""
    count: Callable[[], int] = vars(_core)["vulkan_validation_messages"]  # the generated stub may lag
    return count()


@pytest.fixture(autouse=True)
def no_validation_messages() -> Iterator[None]:
    before = validation_messages()
    yield
    assert validation_messages() == before, "Vulkan validation messages (printed on stderr)"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vulkan")
    return {name: make_model(root / name, init_std=INIT_STD, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def vk() -> Iterator[Engine]:
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=BUDGET, device_kind="vulkan")) as e:
        yield e


@pytest.fixture(scope="module")
def cpu() -> Iterator[Engine]:
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=BUDGET)) as e:
        yield e


def test_device_summary_names_the_vulkan_device(vk: Engine) -> None:
    summary = vk.device_summary()
    assert summary.startswith("vulkan: ") and "heap" in summary and "queue" in summary, summary


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_greedy_tokens_equal_transformers_for_32_steps(vk: Engine, model_dirs: dict[str, Path],
                                                           variant: str) -> None:
    path = model_dirs[variant]
    vk.load_model(variant, path)
    try:
        for n in (7, 40):
            prompt = prompt_ids(n)
            run = ref.hf_greedy(path, prompt, N_GREEDY)
            assert run.margins.min() >= MIN_MARGIN, "test setup: the reference has a near tie"
            assert vk.generate(variant, prompt, greedy(N_GREEDY)) == run.tokens, f"{variant}, prompt of {n}"
            err = ref.rel_error(vk.debug_logits(variant, prompt), run.logits[0])
            assert err <= F32_TOL, f"{variant}: relative error {err:.3g}"
    finally:
        vk.unload_model(variant)


@pytest.mark.parametrize("fmt", list(CONVERSION_TOL))
def test_converted_weights_match_the_reference_rounding_and_the_cpu_engine(
        vk: Engine, cpu: Engine, model_dirs: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    variant = "llama_untied_rope3_gqa4"
    ref_dir = ref.write_converted_model(model_dirs[variant], tmp_path / fmt, fmt)
    name = f"{variant}-{fmt}"
    vk.load_model(name, model_dirs[variant], weights=fmt)
    cpu.load_model(name, model_dirs[variant], weights=fmt)
    try:
        for n in (1, 40):
            err = ref.rel_error(vk.debug_logits(name, prompt_ids(n)), ref.hf_logits(ref_dir, prompt_ids(n)))
            assert err <= CONVERSION_TOL[fmt], f"{fmt}, prompt of {n}: relative error {err:.3g}"
        prompt = prompt_ids(7)
        assert vk.generate(name, prompt, greedy(N_GREEDY)) == cpu.generate(name, prompt, greedy(N_GREEDY))
    finally:
        vk.unload_model(name)
        cpu.unload_model(name)


@pytest.fixture(scope="module")
def kv16() -> Iterator[dict[str, Engine]]:
    vk16 = Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan", kv_dtype="f16"))
    cpu16 = Engine(EngineConfig(budget_bytes=BUDGET, kv_dtype="f16"))
    with vk16, cpu16:
        yield {"vulkan": vk16, "cpu": cpu16}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f16_kv_equals_the_cpu_engine_with_f16_kv(kv16: dict[str, Engine], vk: Engine,
                                                 model_dirs: dict[str, Path], variant: str) -> None:
    path = model_dirs[variant]
    for e in kv16.values():
        e.load_model(variant, path)
    vk.load_model(variant, path)
    try:
        worst = 0.0
        for n in (1, 7, 40):
            ids = prompt_ids(n)
            worst = max(worst, ref.rel_error(kv16["vulkan"].debug_logits(variant, ids),
                                             kv16["cpu"].debug_logits(variant, ids)))
        assert worst <= KV_F16_VS_CPU_TOL, f"{variant}: relative error {worst:.3g}"
        for n in (7, 40):
            prompt = prompt_ids(n)
            assert kv16["vulkan"].generate(variant, prompt, greedy(N_GREEDY)) == \
                kv16["cpu"].generate(variant, prompt, greedy(N_GREEDY)), (variant, n)
        # f16 pages really are read: f32 KV on the same device gives other logits
        assert not np.array_equal(kv16["vulkan"].debug_logits(variant, prompt_ids(40)),
                                  vk.debug_logits(variant, prompt_ids(40)))
        # half the bytes per block, booked in the ledger: twice the positions fit the same KV capacity
        assert kv16["vulkan"].kv_bytes_for(variant, 16) * 2 == vk.kv_bytes_for(variant, 16)
        assert kv16["vulkan"].kv_bytes_for(variant, 16) == kv16["cpu"].kv_bytes_for(variant, 16)
        l16, l32 = kv16["vulkan"].ledger(), vk.ledger()
        assert l16.kv_capacity_bytes == l32.kv_capacity_bytes
        assert l16.models[variant].kv_capacity_tokens >= 2 * l32.models[variant].kv_capacity_tokens - 16
    finally:
        for e in (*kv16.values(), vk):
            e.unload_model(variant)


def _run_together(eng: Engine, model: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids = [eng.new_request_id() for _ in prompts]
    for rid, p in zip(ids, prompts):
        eng.submit(rid, model, p, greedy(n))
    out: dict[int, list[int]] = {rid: [] for rid in ids}
    finished: set[int] = set()
    while len(finished) < len(ids):
        for ev in eng.wait_events(5.0):
            if ev.req_id not in out:
                continue
            assert ev.kind.name != "error", ev
            if ev.kind.name == "token":
                out[ev.req_id].append(ev.token_id)
            else:
                finished.add(ev.req_id)
    return [out[rid] for rid in ids]


def test_batched_sequences_equal_each_alone(vk: Engine, model_dirs: dict[str, Path]) -> None:
    variant = "qwen2_bias_gqa3"
    vk.load_model("batch", model_dirs[variant])
    try:
        prompts = [prompt_ids(n) for n in (1, 5, 15, 16, 17, 31, 33, 70)]  # around the 16-token KV blocks
        together = _run_together(vk, "batch", prompts, 12)
        alone = [vk.generate("batch", p, greedy(12)) for p in prompts]
        assert together == alone
    finally:
        vk.unload_model("batch")


def test_streamed_at_30_percent_of_the_weights_equals_resident(tmp_path: Path) -> None:
    kw = dict(VARIANTS["llama_untied_rope3_gqa4"], n_layers=10)  # 2 slots of 10 layers + the head: ~25 %
    path = make_model(tmp_path / "deep", init_std=INIT_STD, **kw)
    prompts = [prompt_ids(n) for n in (7, 40)]
    runs: dict[str, list[list[int]]] = {}
    for mode in ("resident", "streamed"):
        opts = ModelLoadOptions(residency=ResidencyMode.resident) if mode == "resident" else \
            ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2)
        with Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan")) as e:
            info = e.load_model("m", path, options=opts)
            runs[mode] = _run_together(e, "m", prompts, 16)
            if mode == "streamed":
                assert not info.resident and info.n_slots == 2
                assert info.device_weight_bytes <= 0.3 * info.weight_bytes + 1, info
                assert e.stats().residency.bytes_copied > info.weight_bytes  # streamed, more than once
    assert runs["streamed"] == runs["resident"]


def test_kv_blocks_past_one_storage_binding_use_several_and_equal_the_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bindings forced to 256 KiB (LMX_VK_MAX_BINDING_BYTES): five sequences' KV blocks (40 KiB each) span
    more than one binding, so attention and kv_store read and write them through several (up to four,
    chosen per block); the tokens equal the CPU engine's."""
    binding = 256 << 10
    monkeypatch.setenv("LMX_VK_MAX_BINDING_BYTES", str(binding))
    kw = dict(VARIANTS["llama_untied_rope3_gqa4"], n_layers=10)
    path = make_model(tmp_path / "deep", init_std=INIT_STD, **kw)
    prompts = [prompt_ids(n) for n in (40, 41, 45, 50, 60)]
    runs = {}
    for kind in ("cpu", "vulkan"):
        with Engine(EngineConfig(budget_bytes=BUDGET, device_kind=kind, kv_dtype="f32", max_batch_tokens=32)) as e:
            e.load_model("m", path)
            block = e.kv_bytes_for("m", 16)
            n_blocks = sum(-(-(len(p) + 12) // 16) for p in prompts)
            assert n_blocks * block > 2 * binding, (n_blocks, block)  # the step's KV spans 3+ bindings
            runs[kind] = _run_together(e, "m", prompts, 12)
    assert runs["vulkan"] == runs["cpu"]


@pytest.mark.parametrize("clock", ["gpu timestamps", "host"])
def test_copy_wait_is_measured_streamed_and_zero_resident(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         clock: str) -> None:
    """Compute's wait for layer copies lands in the residency figures the CPU device fills (copy_wait_ms,
    bytes_copied): from GPU timestamps, or measured on the host where the queue has none
    (LMX_VK_NO_TIMESTAMPS=1). A resident model's steps wait for no copy: nothing is charged."""
    if clock == "host":
        monkeypatch.setenv("LMX_VK_NO_TIMESTAMPS", "1")
    kw = dict(VARIANTS["llama_untied_rope3_gqa4"], n_layers=10)
    path = make_model(tmp_path / "deep", init_std=INIT_STD, **kw)
    prompts = [prompt_ids(n) for n in (7, 40)]
    with Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan")) as e:
        assert ("copy wait from GPU timestamps" if clock != "host" else "copy wait measured on the host") in \
            e.device_summary(), e.device_summary()
        e.load_model("r", path, options=ModelLoadOptions(residency=ResidencyMode.resident))
        e.load_model("s", path, options=ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2))
        _run_together(e, "r", prompts, 2)  # the resident model's load copies have landed after its first step
        before = e.stats().residency
        resident = _run_together(e, "r", prompts, 8)
        after_resident = e.stats().residency
        assert after_resident.copy_wait_ms == before.copy_wait_ms and \
            after_resident.bytes_copied == before.bytes_copied
        streamed = _run_together(e, "s", prompts, 8)
        st = e.stats()
        r = st.residency
        assert streamed == resident
        assert r.bytes_copied - after_resident.bytes_copied > e.models()["s"].weight_bytes  # layers cycled
        assert 0.0 < r.copy_wait_ms - after_resident.copy_wait_ms < st.step_ms_total


def test_three_streamed_models_interleaved_equal_the_cpu_engine(tmp_path: Path) -> None:
    """Three 6-layer models, each streamed through 2 slots, requests of all three in flight at once:
    every step refills slots, and the steps alternate models."""
    opts = ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2)
    model_dirs = {name: make_model(tmp_path / name, init_std=INIT_STD, **dict(kw, n_layers=6))
                  for name, kw in VARIANTS.items() if name in LLAMA_QWEN}
    prompts = [prompt_ids(n) for n in (3, 21)]
    results: dict[str, list[list[int]]] = {}
    for kind in ("cpu", "vulkan"):
        with Engine(EngineConfig(budget_bytes=BUDGET, device_kind=kind)) as e:
            for name, path in model_dirs.items():
                e.load_model(name, path, options=opts)
            ids = []
            for name in model_dirs:
                for p in prompts:
                    rid = e.new_request_id()
                    e.submit(rid, name, p, greedy(10))
                    ids.append(rid)
            out: dict[int, list[int]] = {rid: [] for rid in ids}
            finished: set[int] = set()
            while len(finished) < len(ids):
                for ev in e.wait_events(5.0):
                    assert ev.kind.name != "error", ev
                    if ev.kind.name == "token":
                        out[ev.req_id].append(ev.token_id)
                    elif ev.req_id in out:
                        finished.add(ev.req_id)
            results[kind] = [out[rid] for rid in ids]
            weights = sum(m.weight_bytes for m in e.models().values())
            assert e.stats().residency.bytes_copied > 2 * weights  # layers really cycled through the slots
    assert results["vulkan"] == results["cpu"]


def test_a_q4_k_m_patterned_gguf_on_vulkan_equals_the_cpu_engine(tmp_path: Path) -> None:
    """A GGUF mixing formats per tensor and layer as Q4_K_M does (q5_0 / q8_0 / q4_K / q6_K; random
    blocks with finite scales, written by the gguf package), resident and streamed on Vulkan:
    logits within 1e-5 of the CPU engine's on the same file (f32 accumulation order only), the
    same greedy tokens."""
    gguf = pytest.importorskip("gguf")
    q = gguf.GGMLQuantizationType
    dim, ffn, n_layer, vocab = 256, 512, 4, 300
    rng = np.random.default_rng(11)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for add, value in ((w.add_block_count, n_layer), (w.add_context_length, 512), (w.add_embedding_length, dim),
                       (w.add_feed_forward_length, ffn), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_vocab_size, vocab)):
        add(value)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)

    def mat(name: str, qtype: Any, rows: int, cols: int) -> None:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = rows * cols // block_elems
        raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        for off in {q.Q8_0: (0,), q.Q5_0: (0,), q.Q4_K: (0, 2), q.Q6_K: (208,)}[qtype]:
            scales = (rng.standard_normal(n_blocks) * 0.002).astype(np.float16)
            raw[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
        w.add_tensor(name, raw.reshape(rows, -1), raw_dtype=qtype)

    def vec(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))

    mat("token_embd.weight", q.Q8_0, vocab, dim)
    vec("output_norm.weight")
    for layer in range(n_layer):
        p = f"blk.{layer}."
        vec(p + "attn_norm.weight")
        vec(p + "ffn_norm.weight")
        mat(p + "attn_q.weight", q.Q5_0, dim, dim)
        mat(p + "attn_k.weight", q.Q5_0, dim // 2, dim)
        mat(p + "attn_v.weight", q.Q8_0 if layer % 2 == 0 else q.Q5_0, dim // 2, dim)
        mat(p + "attn_output.weight", q.Q4_K, dim, dim)
        mat(p + "ffn_gate.weight", q.Q5_0, ffn, dim)
        mat(p + "ffn_up.weight", q.Q5_0, ffn, dim)
        mat(p + "ffn_down.weight", q.Q6_K if layer % 2 == 0 else q.Q4_K, dim, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "m.gguf"
    prompt = [1, 5, 9, 17, 33, 2, 7, 100, 3]
    with Engine(EngineConfig(kv_dtype="f32", budget_bytes=BUDGET)) as e:
        e.load_model("m", path)
        want_logits = e.debug_logits("m", prompt)
        want = e.generate("m", prompt, greedy(16))
    for opts in (ModelLoadOptions(residency=ResidencyMode.resident),
                 ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2)):
        with Engine(EngineConfig(kv_dtype="f32", budget_bytes=BUDGET, device_kind="vulkan")) as e:
            e.load_model("m", path, options=opts)
            err = ref.rel_error(e.debug_logits("m", prompt), want_logits)
            assert err <= 1e-5, f"{opts.residency}: relative error {err:.3g}"
            assert e.generate("m", prompt, greedy(16)) == want, opts.residency


def _sampled_workload(path: Path, budget_bytes: int) -> tuple[list[list[int]], int]:
    """4 seeded sampled sequences of up to 60 tokens; returns their tokens and the preemption count."""
    prompts = [[(7 * i + j) % 300 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40, 9])]
    with Engine(EngineConfig(budget_bytes=budget_bytes, device_kind="vulkan")) as e:
        e.load_model("m", path, options=ModelLoadOptions(residency=ResidencyMode.resident))
        ids = [e.new_request_id() for _ in prompts]
        for i, (rid, p) in enumerate(zip(ids, prompts)):
            e.submit(rid, "m", p, SamplingParams(temperature=0.9, top_k=50, seed=100 + i, max_tokens=20,
                                                 ignore_eos=True))
        out: dict[int, list[int]] = {rid: [] for rid in ids}
        finished: set[int] = set()
        while len(finished) < len(ids):
            for ev in e.wait_events(5.0):
                assert ev.kind.name != "error", ev
                if ev.kind.name == "token":
                    out[ev.req_id].append(ev.token_id)
                elif ev.req_id in out:
                    finished.add(ev.req_id)
        return [out[rid] for rid in ids], e.stats().n_preemptions


def test_kv_pressure_preempts_by_recompute_with_the_same_tokens(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["qwen2_bias_gqa3"]
    roomy, n_roomy = _sampled_workload(path, BUDGET)
    with Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan")) as probe:
        info = probe.load_model("m", path, options=ModelLoadOptions(residency=ResidencyMode.resident))
        fixed = probe.ledger().used_bytes
        block = probe.kv_bytes_for("m", 1)
    budget = int((fixed + 6 * block) / 0.9) + 1  # 6 KV blocks; the 4 sequences need 10+
    tight, n_tight = _sampled_workload(path, budget)
    assert n_roomy == 0 and n_tight > 0, (n_roomy, n_tight, info)
    assert tight == roomy


def test_out_of_device_memory_at_load_is_a_capacity_error_and_the_engine_serves_on(
        model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Device memory blocks are allocated when first used: a block the driver refuses (injected with
    LMX_VK_FAIL_ALLOC_AFTER) fails that load with one actionable line naming the bytes asked and held;
    nothing stays booked, the loaded model keeps serving, and the same load succeeds once memory is back."""
    monkeypatch.setenv("LMX_VK_BLOCK_BYTES", str(4 << 20))  # 16 blocks of 4 MiB
    with Engine(EngineConfig(budget_bytes=64 << 20, device_kind="vulkan")) as e:
        e.load_model("a", model_dirs["smol_tied_gqa1"])
        want = e.generate("a", prompt_ids(7), greedy(8))
        used = e.ledger().used_bytes
        monkeypatch.setenv("LMX_VK_FAIL_ALLOC_AFTER", "0")  # every block not held yet is refused
        with pytest.raises(CapacityError, match=r"cannot load model 'b': it needs .* MiB .* the GPU refused device "
                                                r"memory: vkAllocateMemory of a 4 MiB block \(4194304 bytes\) failed: "
                                                r"VK_ERROR_OUT_OF_DEVICE_MEMORY .* lower \[device\] budget"):
            e.load_model("b", model_dirs["llama_untied_rope3_gqa4"])  # its workspace needs a new block
        assert e.ledger().used_bytes == used and "b" not in e.models()
        assert e.generate("a", prompt_ids(7), greedy(8)) == want
        monkeypatch.delenv("LMX_VK_FAIL_ALLOC_AFTER")
        e.load_model("b", model_dirs["llama_untied_rope3_gqa4"])
        assert len(e.generate("b", prompt_ids(7), greedy(8))) == 8
        assert e.generate("a", prompt_ids(7), greedy(8)) == want


def _terminal_events(e: Engine, ids: set[int]) -> tuple[dict[int, list[EngineEvent]], int]:
    """Events of `ids` until each has ended, then half a second more: terminal events per id, tokens seen."""
    ended: dict[int, list[EngineEvent]] = {rid: [] for rid in ids}
    n_tokens = 0
    deadline = time.monotonic() + 120
    while any(not v for v in ended.values()):
        assert time.monotonic() < deadline, ended
        for ev in e.wait_events(1.0):
            if ev.kind.name == "token":
                n_tokens += 1
            else:
                ended[ev.req_id].append(ev)
    for ev in e.wait_events(0.5):  # nothing more for them
        assert ev.req_id not in ids, ev
    return ended, n_tokens


def test_a_lost_device_ends_every_request_once_and_a_new_engine_serves(
        model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU is lost mid-generation (injected: queue submission 61 and every one after it fail with
    VK_ERROR_DEVICE_LOST). Every request in flight, of both models, ends with exactly one error event
    (engine_failure, naming the loss); the engine reports the fault in its health; a request submitted
    afterwards ends the same way at its first step; a new engine on the same GPU serves again."""
    names = LLAMA_QWEN[1:]
    monkeypatch.setenv("LMX_VK_LOSE_DEVICE_AFTER", "60")
    with Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan")) as e:
        for name in names:
            e.load_model(name, model_dirs[name])
        assert e.health().device_fault == ""
        ids = set()
        for name in names:
            for n in (3, 20):
                rid = e.new_request_id()
                e.submit(rid, name, prompt_ids(n), greedy(200))
                ids.add(rid)
        ended, n_tokens = _terminal_events(e, ids)
        assert n_tokens > 0, "the device was lost before any token: nothing was in flight"
        for rid, evs in ended.items():
            assert len(evs) == 1 and evs[0].kind.name == "error", (rid, evs)
            assert evs[0].error_code == ErrorCode.engine_failure and "VK_ERROR_DEVICE_LOST" in evs[0].message, evs
        assert "VK_ERROR_DEVICE_LOST" in e.health().device_fault
        late = e.new_request_id()
        e.submit(late, names[0], prompt_ids(5), greedy(4))
        ended, _ = _terminal_events(e, {late})
        assert ended[late][0].error_code == ErrorCode.engine_failure, ended
    monkeypatch.delenv("LMX_VK_LOSE_DEVICE_AFTER")
    with Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan")) as fresh:
        fresh.load_model(names[0], model_dirs[names[0]])
        assert len(fresh.generate(names[0], prompt_ids(5), greedy(4))) == 4
        assert fresh.health().device_fault == ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a worker and give it two minutes to drain before killing it."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()


def test_a_worker_whose_gpu_is_lost_answers_every_request_once_with_worker_failure(
        model_dirs: dict[str, Path], redis_url: str, tmp_path: Path) -> None:
    """A real worker on the Vulkan device, fed through Redis, loses its GPU mid-generation (injected,
    LMX_VK_LOSE_DEVICE_AFTER): every request in flight, and one sent afterwards, gets exactly one terminal
    event in its reply stream, an error with code worker_failure naming the loss; the worker stays up, answering,
    but its heartbeat stops, so `status --alive` (the liveness probe) exits 1 and the orchestrator restarts
    it (docs/vulkan.md); it exits 0 on SIGTERM."""
    name = "smol_tied_gqa1"
    lines = [f'redis_url = "{redis_url}"', 'key_prefix = "vkl"', 'worker_id = "vkl1"', "[device]", 'kind = "vulkan"',
             f'budget = "{BUDGET >> 20}MiB"', "[[models]]", f'name = "{name}"', f'path = "{model_dirs[name]}"']
    config = tmp_path / "worker.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    env["LMX_VK_LOSE_DEVICE_AFTER"] = "40"
    log = tmp_path / "worker.log"
    client = redis.Redis.from_url(redis_url)
    with log.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", f"import worker.arq_app as a; a.run({str(config)!r})"],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not client.hexists(Keys("vkl").workers(), "vkl1"):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)

            async def submit_all(n: int) -> list[tuple[str, BaseException | None]]:
                async with AsyncProducer(redis_url, prefix="vkl") as producer:
                    handles = [await producer.submit(name, prompt=f"Hello {i}", max_tokens=200, temperature=0.0)
                               for i in range(n)]
                    out: list[tuple[str, BaseException | None]] = []
                    for h in handles:
                        try:
                            await asyncio.wait_for(h.result(), 300)
                            out.append((h.request_id, None))
                        except WorkerFailureError as e:
                            out.append((h.request_id, e))
                    return out

            results = asyncio.run(submit_all(4)) + asyncio.run(submit_all(1))  # in flight, then after the loss
            for request_id, err in results:
                assert err is not None and "VK_ERROR_DEVICE_LOST" in str(err), (request_id, err)
                events = [decode_event(f[b"data"]) for _, f in client.xrange(Keys("vkl").events(request_id))]
                terminal = [ev for ev in events if ev.type in ("done", "error", "cancelled")]
                assert len(terminal) == 1 and terminal[0].type == "error", events
                assert terminal[0].code == "worker_failure", terminal[0]
            assert proc.poll() is None, log.read_text()  # still up, answering
            # ... but no longer alive to the liveness probe: the heartbeat stops on a device fault.
            deadline = time.monotonic() + 60
            while client.exists(Keys("vkl").heartbeat("vkl1")):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            probe = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--alive", "vkl1", "--redis-url",
                                    redis_url, "--prefix", "vkl"], env=env, capture_output=True, text=True, timeout=60,
                                   check=False)
            assert probe.returncode == 1, probe
            assert "heartbeat stopped so the liveness probe restarts this worker" in log.read_text()
        finally:
            client.close()
            _stop(proc)
    assert proc.returncode == 0, log.read_text()
    assert "[vulkan validation" not in log.read_text()


def test_asking_for_a_missing_vulkan_device_names_what_was_found() -> None:
    with pytest.raises(LayermuxError, match=r"index 9: expected a Vulkan device there, found 0: "):
        Engine(EngineConfig(budget_bytes=16 << 20, device_kind="vulkan", device_index=9))


def _generate_cli(model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", "generate", str(model), "--prompt-ids", "5,17,99,300",
                           "--max-tokens", "8", "--budget", "64MiB", "--json", *extra],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_generate_on_the_vulkan_device_equals_the_cpu(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["smol_tied_gqa1"]
    on_cpu = _generate_cli(path)
    on_vk = _generate_cli(path, "--device", "vulkan")
    assert on_cpu.returncode == 0 and on_vk.returncode == 0, on_vk.stderr
    assert json.loads(on_vk.stdout)["token_ids"] == json.loads(on_cpu.stdout)["token_ids"]
    assert "[vulkan validation" not in on_vk.stderr  # the child runs under the layer too (LMX_VK_VALIDATION)
    missing = _generate_cli(path, "--device", "vulkan", "--device-index", "9")
    assert missing.returncode == 1
    errors = [line for line in missing.stderr.splitlines() if line.startswith("layermux generate: error:")]
    assert len(errors) == 1 and "found 0: " in errors[0] and "Traceback" not in missing.stderr, missing.stderr


def test_three_models_through_a_worker_and_redis_on_vulkan_equal_direct_generation(
        model_dirs: dict[str, Path], redis_url: str, tmp_path: Path) -> None:
    """A real worker process ([device] kind = "vulkan") serving the three models, fed through Redis
    by the SDK: greedy results equal Engine.generate on the Vulkan device in this process."""
    model_dirs = {name: model_dirs[name] for name in LLAMA_QWEN}
    lines = [f'redis_url = "{redis_url}"', 'key_prefix = "vk"', 'worker_id = "vk1"', "[device]", 'kind = "vulkan"',
             f'budget = "{BUDGET >> 20}MiB"']
    for name, path in model_dirs.items():
        lines += ["[[models]]", f'name = "{name}"', f'path = "{path}"']
    config = tmp_path / "worker.toml"
    config.write_text("\n".join(lines) + "\n")
    prompts = ["Hello world", "The quick brown fox jumps"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    log = tmp_path / "worker.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", f"import worker.arq_app as a; a.run({str(config)!r})"],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis.from_url(redis_url)
            deadline = time.monotonic() + 300
            while not client.hexists(Keys("vk").workers(), "vk1"):  # registered: it serves its models
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            client.close()

            async def submit_all() -> list[list[int]]:
                async with AsyncProducer(redis_url, prefix="vk") as producer:
                    handles = [await producer.submit(name, prompt=p, max_tokens=16, temperature=0.0)
                               for name in model_dirs for p in prompts]
                    return [list((await asyncio.wait_for(h.result(), 300)).token_ids) for h in handles]

            served = asyncio.run(submit_all())
            # `layermux status` names the device the worker books (its status document's ledger).
            deadline = time.monotonic() + 60
            while True:
                st = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--redis-url", redis_url,
                                     "--prefix", "vk"], capture_output=True, text=True, timeout=60, check=False)
                if "device vulkan: " in st.stdout:
                    break
                assert time.monotonic() < deadline, st.stdout + st.stderr
                time.sleep(0.2)
        finally:
            _stop(proc)
    assert proc.returncode == 0, log.read_text()
    assert "[vulkan validation" not in log.read_text()
    want = []
    with Engine(EngineConfig(budget_bytes=BUDGET, device_kind="vulkan")) as e:
        for name, path in model_dirs.items():
            e.load_model(name, path)
            tok = Tokenizer.from_model_dir(path)
            want += [e.generate(name, tok.encode(p), SamplingParams(temperature=0.0, max_tokens=16)) for p in prompts]
    assert served == want

