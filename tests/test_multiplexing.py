"""Layer multiplexing: streamed models generate what resident ones do; the ledger holds under random workloads.

Real engine, real files (random models written by tools.model_factory); nothing mocked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from engine import (
    CapacityError,
    Engine,
    EngineConfig,
    ErrorCode,
    EventKind,
    Eviction,
    FinishReason,
    MatmulPrecision,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
)
from tools.model_factory import make_model

MODELS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama", "hidden": 64, "n_layers": 10, "n_heads": 4, "n_kv_heads": 2, "intermediate": 256,
              "seed": 3},
    "qwen": {"arch": "qwen2", "hidden": 64, "n_layers": 12, "n_heads": 4, "n_kv_heads": 1, "intermediate": 192,
             "seed": 4, "tie_embeddings": True},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mux-models")
    return {name: make_model(root / name, init_std=0.2, **kw) for name, kw in MODELS.items()}


RESIDENT = ModelLoadOptions(residency=ResidencyMode.resident)


def streamed(n_slots: int) -> ModelLoadOptions:
    return ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=n_slots)


def _collect(eng: Engine, ids: set[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        for ev in eng.wait_events(5.0):
            assert ev.kind != EventKind.error, ev.message
            if ev.kind == EventKind.token:
                out[ev.req_id].append(ev.token_id)
            elif ev.kind == EventKind.done:
                open_ids.discard(ev.req_id)
    return out


def _run_workload(model_dir: Path, budget_bytes: int, options: ModelLoadOptions,
                  precision: MatmulPrecision = MatmulPrecision.exact,
                  weights: str = "auto") -> tuple[dict[int, list[int]], dict[str, float]]:
    prompts = [[(7 * i + j) % 300 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40, 9])]
    with Engine(EngineConfig(budget_bytes=budget_bytes, n_threads=2, matmul_precision=precision)) as eng:
        loaded = eng.load_model("m", model_dir, weights, options)
        if precision == MatmulPrecision.fast and weights == "q8_0":
            assert loaded.matrix_format == "q8_0x16", loaded
        # All four arrive before the first step (the step thread is held while they are submitted): on a
        # loaded machine a step thread running between submits staggered them, and the tight-KV test then
        # saw no preemption.
        eng.debug_stall(True)
        for i, p in enumerate(prompts):
            eng.submit(i + 1, "m", p, SamplingParams(temperature=0.9, top_k=50, seed=100 + i, max_tokens=20,
                                                     ignore_eos=True))
        eng.debug_stall(False)
        out = _collect(eng, {1, 2, 3, 4})
        info = eng.models()["m"]
        st = eng.stats()
        return out, {"resident": float(info.resident), "bytes_copied": float(st.residency.bytes_copied),
                     "n_preemptions": float(st.n_preemptions)}


def test_streamed_under_30_percent_budget_generates_same_tokens_as_resident(model_dirs: dict[str, Path]) -> None:
    for name, path in model_dirs.items():
        with Engine(EngineConfig(budget_bytes=64 << 20)) as probe:
            weight_bytes = probe.load_model("m", path).weight_bytes
        resident, rs = _run_workload(path, 64 << 20, RESIDENT)
        # 30 % of the weights for the layer slots, plus room for workspace and KV.
        with Engine(EngineConfig(budget_bytes=64 << 20)) as probe:
            info = probe.load_model("m", path, options=streamed(2))
            assert info.device_weight_bytes <= 0.3 * weight_bytes + 1, (name, info)
        out, ss = _run_workload(path, 64 << 20, streamed(2))
        assert rs["resident"] == 1.0 and ss["resident"] == 0.0
        assert ss["bytes_copied"] > weight_bytes  # layers really streamed, more than once
        assert out == resident, name


def test_repacked_int8_weights_stream_through_layer_slots_with_the_same_tokens(model_dirs: dict[str, Path]) -> None:
    """Fast precision's q8_0x16 layers are copied into slots as bytes like any other format."""
    path = model_dirs["qwen"]
    fast = MatmulPrecision.fast
    resident, rs = _run_workload(path, 64 << 20, RESIDENT, fast, weights="q8_0")
    out, ss = _run_workload(path, 64 << 20, streamed(2), fast, weights="q8_0")
    exact, _ = _run_workload(path, 64 << 20, RESIDENT, MatmulPrecision.exact, weights="q8_0")
    assert rs["resident"] == 1.0 and ss["resident"] == 0.0 and ss["bytes_copied"] > 0
    assert out == resident
    assert exact != resident  # the fast run did take the int8 path


def test_lru_and_no_prefetch_variants_generate_the_same_tokens(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["llama"]
    base, _ = _run_workload(path, 64 << 20, RESIDENT)
    for cfg in (EngineConfig(budget_bytes=64 << 20, n_threads=2, eviction=Eviction.lru),
                EngineConfig(budget_bytes=64 << 20, n_threads=2, prefetch_depth=0),
                EngineConfig(budget_bytes=64 << 20, n_threads=2, prefetch_depth=4)):
        prompts_out = None
        with Engine(cfg) as eng:
            eng.load_model("m", path, options=streamed(3))
            prompts = [[(7 * i + j) % 300 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40, 9])]
            for i, p in enumerate(prompts):
                eng.submit(i + 1, "m", p, SamplingParams(temperature=0.9, top_k=50, seed=100 + i, max_tokens=20,
                                                         ignore_eos=True))
            prompts_out = _collect(eng, {1, 2, 3, 4})
        assert prompts_out == base, cfg


def test_kv_pressure_preempts_and_resumes_with_identical_output(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["qwen"]
    roomy, _ = _run_workload(path, 64 << 20, RESIDENT)
    with Engine(EngineConfig(budget_bytes=64 << 20)) as probe:
        info = probe.load_model("m", path, options=RESIDENT)
        fixed = probe.ledger().used_bytes
        block = info.footprint.kv_block_bytes
    # Budget: the model plus 6 KV blocks (16 tokens each) — 4 sequences of up to 60 tokens need 10+.
    budget = int((fixed + 6 * block) / 0.9) + 1
    tight, stats = _run_workload(path, budget, RESIDENT)
    assert stats["n_preemptions"] > 0
    assert tight == roomy


def test_model_whose_bytes_cannot_be_booked_is_refused_with_numbers_and_books_nothing(
    model_dirs: dict[str, Path],
) -> None:
    with Engine(EngineConfig(budget_bytes=256 << 10)) as eng:
        before = eng.ledger().used_bytes
        with pytest.raises(CapacityError, match=r"needs .* MiB .* ledger has .* free under its cap"):
            eng.load_model("m", model_dirs["llama"], options=RESIDENT)
        assert eng.ledger().used_bytes == before
        assert eng.models() == {}


class LedgerMachine(RuleBasedStateMachine):
    """Random loads, unloads, requests and cancellations; the ledger's invariants hold throughout."""

    dirs: ClassVar[dict[str, Path]] = {}
    n_workloads = 0

    @initialize(budget_kib=st.integers(min_value=700, max_value=6000), slots=st.integers(min_value=0, max_value=3))
    def start(self, budget_kib: int, slots: int) -> None:
        LedgerMachine.n_workloads += 1
        self.eng = Engine(EngineConfig(budget_bytes=budget_kib << 10, n_threads=1, kv_block_tokens=8,
                                       max_batch_tokens=64))
        self.slots = slots
        self.loaded: set[str] = set()
        self.live: set[int] = set()
        self.next_id = 1

    def teardown(self) -> None:
        self.drain()
        self.eng.close()

    def drain(self) -> None:
        while self.live:
            for ev in self.eng.wait_events(5.0):
                if ev.kind != EventKind.token:
                    self.live.discard(ev.req_id)

    @rule(name=st.sampled_from(sorted(MODELS)),
          residency=st.sampled_from([ResidencyMode.auto, ResidencyMode.resident, ResidencyMode.streamed]))
    def load(self, name: str, residency: ResidencyMode) -> None:
        if name in self.loaded:
            return
        try:
            self.eng.load_model(name, self.dirs[name],
                                options=ModelLoadOptions(residency=residency, stream_slots=self.slots))
            self.loaded.add(name)
        except CapacityError:
            assert name not in self.eng.ledger().models  # refused whole: nothing of it stays booked

    @rule(name=st.sampled_from(sorted(MODELS)))
    def unload(self, name: str) -> None:
        if name in self.loaded:
            self.eng.unload_model(name)
            self.loaded.discard(name)
            assert name not in self.eng.ledger().models

    @rule(name=st.sampled_from(sorted(MODELS)), n_prompt=st.integers(1, 60), max_tokens=st.integers(1, 12),
          seed=st.integers(0, 2**32))
    def submit(self, name: str, n_prompt: int, max_tokens: int, seed: int) -> None:
        if name not in self.loaded:
            return
        rid = self.next_id
        self.next_id += 1
        self.eng.submit(rid, name, [(seed + j) % 400 + 3 for j in range(n_prompt)],
                        SamplingParams(temperature=0.8, seed=seed, max_tokens=max_tokens))
        self.live.add(rid)

    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        if self.live:
            self.eng.cancel(sorted(self.live)[pick % len(self.live)])

    @rule()
    def wait_idle(self) -> None:
        self.drain()
        ledger = self.eng.ledger()
        assert all(m.kv_bytes == 0 for m in ledger.models.values()), ledger  # idle: no KV held
        models = self.eng.models()
        baseline = sum(m.device_weight_bytes + m.workspace_bytes for m in models.values())
        assert ledger.used_bytes >= baseline
        assert ledger.used_bytes - baseline <= 64 * (3 * len(models) + 64), ledger  # only alignment slack
        for m in models.values():  # what the footprint says is what the ledger booked
            fp = m.footprint
            assert fp.device_bytes(fp.n_layer if m.resident else m.n_slots) == m.device_weight_bytes + m.workspace_bytes
            assert ledger.models[m.name].kv_capacity_blocks == ledger.kv_capacity_bytes // fp.kv_block_bytes

    @invariant()
    def under_cap(self) -> None:
        if hasattr(self, "eng"):
            ledger = self.eng.ledger()
            assert ledger.used_bytes <= ledger.cap_bytes
            assert ledger.peak_bytes <= ledger.cap_bytes


def test_ledger_never_exceeds_cap_and_returns_to_baseline_over_1000_workloads(model_dirs: dict[str, Path]) -> None:
    LedgerMachine.dirs = model_dirs
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(max_examples=1000, stateful_step_count=12, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )
    assert LedgerMachine.n_workloads >= 1000


def test_loading_a_model_does_not_block_serving_another(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    big = make_model(tmp_path / "big", arch="llama", hidden=128, n_layers=8, n_heads=4, n_kv_heads=2,
                     intermediate=512, seed=9)
    with Engine(EngineConfig(budget_bytes=256 << 20, n_threads=2)) as eng:
        eng.load_model("a", model_dirs["llama"])
        eng.submit(1, "a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        tokens_seen_during_load: list[int] = []

        def progress(done: int, total: int) -> None:
            # Called from the loading thread between layers: model "a" keeps producing meanwhile.
            before = eng.stats().n_tokens_generated
            for _ in range(200):
                if eng.stats().n_tokens_generated > before:
                    tokens_seen_during_load.append(done)
                    return
                time.sleep(0.005)

        eng.load_model("b", big, weights="q8_0", progress=progress)
        assert len(tokens_seen_during_load) >= 3, tokens_seen_during_load
        assert set(eng.models()) == {"a", "b"}
        eng.cancel(1)


SWAP = ModelLoadOptions(residency=ResidencyMode.swap)


def test_a_step_that_cannot_run_ends_its_requests_with_an_error_not_the_process(tmp_path: Path) -> None:
    """Two whole-model-swap models; the small one holds KV that leaves too little room to swap the
    big one in. The big model's step fails: its request ends with an error event naming why, and
    the small model's request goes on (before the fix: std::terminate)."""
    common: dict[str, Any] = {"n_heads": 4, "n_kv_heads": 2, "max_position_embeddings": 4096}
    small = make_model(tmp_path / "small", hidden=64, n_layers=2, intermediate=128, seed=1, **common)
    big = make_model(tmp_path / "big", hidden=128, n_layers=4, intermediate=512, seed=2, **common)
    probe = Engine(EngineConfig(budget_bytes=256 << 20, n_threads=1, kv_dtype="f32"))  # the KV sizes below
    try:
        probe.load_model("small", small, options=SWAP)
        probe.load_model("big", big, options=SWAP)
        info = probe.models()
    finally:
        probe.close()
    workspaces = info["small"].workspace_bytes + info["big"].workspace_bytes
    slack = 256 << 10  # less than the small model's KV below
    cap = workspaces + info["big"].weight_bytes + slack
    eng = Engine(EngineConfig(budget_bytes=int(cap / 0.9) + 1, cap_fraction=0.9, n_threads=1, kv_dtype="f32"))
    try:
        eng.load_model("small", small, options=SWAP)
        eng.load_model("big", big, options=SWAP)
        long_prompt = [(i * 7) % 200 + 3 for i in range(1000)]  # 1000 x 512 B of KV > slack
        assert info["small"].footprint.kv_bytes_per_token * len(long_prompt) > slack
        # Long enough to still be running when the big model's step comes, however slow the machine.
        eng.submit(1, "small", long_prompt, SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0.0))
        events: list[Any] = []
        ended: dict[int, Any] = {}

        def pump(until: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 120
            while not until():
                assert time.monotonic() < deadline, events[-5:]
                for e in eng.wait_events(1.0):
                    events.append(e)
                    if e.kind != EventKind.token:
                        ended[e.req_id] = e

        def n_tokens(req_id: int) -> int:
            return sum(e.req_id == req_id and e.kind == EventKind.token for e in events)

        pump(lambda: n_tokens(1) > 0)
        eng.submit(2, "big", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        pump(lambda: 2 in ended)
        err = ended[2]
        assert 1 not in ended, "the small model finished first: its KV was gone, nothing was tested"
        assert err.kind == EventKind.error and err.error_code == ErrorCode.engine_failure, err
        after = n_tokens(1)
        pump(lambda: n_tokens(1) >= after + 5 or 1 in ended)  # the small model's request goes on
        assert n_tokens(1) >= after + 5 or ended[1].kind == EventKind.done, ended
        eng.cancel(1)
        pump(lambda: 1 in ended)
        assert ended[1].kind == EventKind.done and ended[1].finish_reason == FinishReason.cancelled
        # The engine still serves both models once the KV is gone.
        assert len(eng.generate("big", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))) == 3
        assert eng.ledger().peak_bytes <= eng.ledger().cap_bytes
    finally:
        eng.close()


def _run_pair(model_dirs: dict[str, Path], max_turn_steps: int, names: tuple[str, ...]) -> tuple[
        dict[int, list[int]], Any]:
    """Both models streamed on 2 slots each, 4 requests per model submitted at once."""
    cfg = EngineConfig(budget_bytes=64 << 20, n_threads=2, max_turn_steps=max_turn_steps)
    with Engine(cfg) as eng:
        for name in MODELS:
            eng.load_model(name, model_dirs[name], options=streamed(2))
        ids = set()
        for m, name in enumerate(MODELS):
            if name not in names:
                continue
            for i, n in enumerate([3, 17, 40, 9]):
                rid = 10 * m + i + 1
                prompt = [(7 * rid + j) % 300 + 3 for j in range(n)]
                eng.submit(rid, name, prompt, SamplingParams(temperature=0.9, top_k=50, seed=100 + rid,
                                                             max_tokens=12 + 3 * i, ignore_eos=True))
                ids.add(rid)
        out = _collect(eng, ids)
        return out, eng.stats()


def test_adaptive_turns_borrow_across_layer_sizes_and_give_the_tokens_of_streaming_and_of_alone(
        model_dirs: dict[str, Path]) -> None:
    """The two models' layers differ in size (llama 256-wide MLP, qwen 192): a borrowed region is re-carved
    for the borrower's layers, and no token changes — against per-step streaming (max_turn_steps 0) and each
    model's requests served alone."""
    turns, st = _run_pair(model_dirs, 8, tuple(MODELS))
    stream, st0 = _run_pair(model_dirs, 0, tuple(MODELS))
    assert st.n_borrow_turns > 0 and st0.n_turns == 0
    assert st.residency.bytes_copied < st0.residency.bytes_copied  # the point of borrowing
    assert turns == stream
    for name in MODELS:
        alone, _ = _run_pair(model_dirs, 8, (name,))
        assert alone == {rid: toks for rid, toks in turns.items() if rid in alone}
