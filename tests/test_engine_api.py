"""The engine's typed boundary: the committed stub matches the module, footprints equal what loading
books, one plan places several models, KV capacity is reported directly, and engine error codes
reach a producer as the protocol's codes (a request whose KV can never fit: kv_exceeds_budget).

Regenerate the stub after changing engine/src/bindings.cpp: `.venv/bin/python tests/test_engine_api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    MIN_SLOTS,
    Engine,
    EngineConfig,
    ErrorCode,
    EventKind,
    MatmulPrecision,
    ModelLoadOptions,
    RequestFailedError,
    ResidencyMode,
    SamplingParams,
)
from producer_sdk import RejectedError
from producer_sdk.client import AsyncProducer
from tools.model_factory import make_model
from worker.runtime import Runtime
from worker.settings import DeviceSettings, ModelSettings, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "engine" / "_core.pyi"
ENUMS = ("Eviction", "MatmulPrecision", "ResidencyMode", "EventKind", "FinishReason", "ErrorCode")
RESIDENT = ModelLoadOptions(residency=ResidencyMode.resident)


def generate_stub(out_dir: Path) -> str:
    """engine/_core.pyi as pybind11-stubgen writes it for the module built now."""
    cmd = [sys.executable, "-m", "pybind11_stubgen", "engine._core", "-o", str(out_dir), "--exit-code",
           "--enum-class-locations", f"{'|'.join(ENUMS)}:engine._core"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return (out_dir / "engine" / "_core.pyi").read_text()


def test_committed_stub_matches_the_compiled_module(tmp_path: Path) -> None:
    fresh = generate_stub(tmp_path)
    assert STUB.read_text() == fresh, (
        "engine/_core.pyi is out of date with engine/src/bindings.cpp; regenerate it with "
        "`.venv/bin/python tests/test_engine_api.py` and commit it")


def test_worker_settings_take_their_defaults_from_the_engine_types() -> None:
    engine, load = EngineConfig(), ModelLoadOptions()
    device = DeviceSettings()
    assert device.budget == engine.budget_bytes and device.cap_fraction == engine.cap_fraction
    assert device.prefetch_depth == engine.prefetch_depth and device.n_threads == engine.n_threads
    assert device.eviction == engine.eviction.name and device.matmul_precision == engine.matmul_precision.name
    assert device.kv_block_tokens == engine.kv_block_tokens and device.max_batch_tokens == engine.max_batch_tokens
    model = ModelSettings(name="m", path="/m")
    assert model.max_running == load.max_running and model.sched_weight == load.sched_weight
    assert model.residency == load.residency.name


# -- footprints ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-models")
    return {
        "llama": make_model(root / "llama", arch="llama", hidden=64, n_layers=4, n_heads=4, n_kv_heads=2,
                            intermediate=160, seed=1),
        "qwen": make_model(root / "qwen", arch="qwen2", hidden=64, n_layers=3, n_heads=4, n_kv_heads=1,
                           intermediate=192, seed=2, tie_embeddings=True),
    }


@pytest.mark.parametrize("precision", [MatmulPrecision.exact, MatmulPrecision.fast])
@pytest.mark.parametrize("weights", ["auto", "f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("variant", ["llama", "qwen"])
def test_footprint_equals_what_loading_books(model_dirs: dict[str, Path], variant: str, weights: str,
                                             precision: MatmulPrecision) -> None:
    cfg = EngineConfig(budget_bytes=64 << 20, n_threads=2, kv_block_tokens=8, matmul_precision=precision)
    for options in (RESIDENT, ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2)):
        with Engine(cfg) as eng:
            fp = eng.footprint(model_dirs[variant], weights)
            assert eng.ledger().used_bytes == 0  # computed from the headers: nothing booked
            info = eng.load_model("m", model_dirs[variant], weights, options)
            booked = eng.ledger().models["m"]
            n_slots = fp.n_layer if info.resident else info.n_slots
            assert booked.weights_bytes + booked.workspace_bytes == fp.device_bytes(n_slots), (fp, info)
            assert booked.workspace_bytes == fp.workspace_bytes
            assert info.weight_bytes == fp.weight_bytes
            assert (fp.weights, fp.matrix_format) == (info.weights, info.matrix_format)
            assert eng.kv_bytes_for("m", 8) == fp.kv_block_bytes and fp.kv_block_tokens == 8
            if precision == MatmulPrecision.fast and weights in ("q8_0", "q4_0"):
                assert fp.matrix_format == f"{weights}x16"


def test_one_plan_places_several_models_and_loading_books_its_bytes(model_dirs: dict[str, Path]) -> None:
    models = [(name, path, "auto") for name, path in model_dirs.items()]
    with Engine(EngineConfig(n_threads=2)) as calc:
        fps = {name: calc.footprint(path) for name, path, _ in models}
    minimum = sum(f.device_bytes(MIN_SLOTS) for f in fps.values())
    budget = int(minimum / 0.75 / 0.9) + (1 << 20)  # room for more than the minimums, not for everything
    with Engine(EngineConfig(budget_bytes=budget, n_threads=2)) as eng:
        plan = eng.plan_residency(models)
        assert plan is not None and [p.name for p in plan] == list(model_dirs)
        for p in plan:
            n = p.n_slots if p.residency == ResidencyMode.streamed else fps[p.name].n_layer
            assert p.device_bytes == fps[p.name].device_bytes(n)
            eng.load_model(p.name, model_dirs[p.name], options=ModelLoadOptions(residency=p.residency,
                                                                               stream_slots=p.n_slots))
        ledger = eng.ledger()
        assert ledger.used_bytes == sum(p.device_bytes for p in plan)
        assert ledger.used_bytes + int(ledger.cap_bytes * EngineConfig().kv_reserve_fraction) <= ledger.cap_bytes
    with Engine(EngineConfig(budget_bytes=minimum // 2, n_threads=2)) as small:
        assert small.plan_residency(models) is None


def test_ledger_reports_kv_capacity_in_bytes_blocks_and_tokens(model_dirs: dict[str, Path]) -> None:
    with Engine(EngineConfig(budget_bytes=16 << 20, n_threads=2, kv_block_tokens=16)) as eng:
        a = eng.load_model("a", model_dirs["llama"], options=RESIDENT)
        eng.load_model("b", model_dirs["qwen"], options=RESIDENT)
        ledger = eng.ledger()
        fixed = sum(o.weights_bytes + o.workspace_bytes for o in ledger.models.values())
        assert ledger.kv_capacity_bytes == ledger.cap_bytes - fixed
        blocks = ledger.kv_capacity_bytes // a.footprint.kv_block_bytes
        assert ledger.models["a"].kv_capacity_blocks == blocks
        assert ledger.models["a"].kv_capacity_tokens == blocks * 16


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[tuple[Runtime, Engine, AsyncProducer]]:
    """A started worker (real Redis, real engine) and a producer on its prefix; drained after."""
    rt = Runtime(settings)
    producer = AsyncProducer(settings.redis_url or "", prefix=settings.key_prefix)
    try:
        await rt.start()
        assert rt.driver.eng is not None
        yield rt, rt.driver.eng, producer
    finally:
        await rt.drain(timeout_s=10)
        await producer.aclose()


# -- structured codes ------------------------------------------------------------------------------------


def _kv_tight_engine(path: Path, n_blocks: int) -> Engine:
    """An engine holding the model resident with room for exactly n_blocks KV blocks."""
    with Engine(EngineConfig(n_threads=1)) as calc:
        fp = calc.footprint(path)
    cap = fp.device_bytes(fp.n_layer) + n_blocks * fp.kv_block_bytes
    budget = int(cap / 0.9) + 2
    eng = Engine(EngineConfig(budget_bytes=budget, n_threads=1))
    eng.load_model("m", path, options=RESIDENT)
    assert eng.ledger().models["m"].kv_capacity_blocks == n_blocks
    return eng


def test_request_whose_prompt_kv_never_fits_ends_with_kv_exceeds_budget(model_dirs: dict[str, Path]) -> None:
    eng = _kv_tight_engine(model_dirs["llama"], 3)
    try:
        with pytest.raises(RequestFailedError) as err:
            eng.generate("m", [5] * 60, SamplingParams(max_tokens=2, ignore_eos=True))  # 4 blocks
        assert err.value.code == ErrorCode.kv_exceeds_budget
        # The engine goes on serving what fits.
        assert len(eng.generate("m", [5] * 20, SamplingParams(max_tokens=4, ignore_eos=True))) == 4
    finally:
        eng.close()


def test_request_that_outgrows_the_device_alone_ends_with_kv_exceeds_budget(model_dirs: dict[str, Path]) -> None:
    """The prompt fits, the generation cannot: once it alone holds every block and still needs one
    more, it ends (before: preempted and recomputed forever)."""
    eng = _kv_tight_engine(model_dirs["llama"], 3)
    try:
        rid = eng.new_request_id()
        eng.submit(rid, "m", [5] * 10, SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0))
        tokens, last = 0, None
        while last is None:
            for ev in eng.wait_events(5.0):
                if ev.kind == EventKind.token:
                    tokens += 1
                else:
                    last = ev
        assert last.kind == EventKind.error and last.error_code == ErrorCode.kv_exceeds_budget, last
        assert tokens == 3 * 16 - 10 + 1  # every position the device could ever give was used
        assert eng.ledger().models["m"].kv_bytes == 0
    finally:
        eng.close()


def test_engine_kv_exceeds_budget_reaches_the_producer_as_rejected_with_that_code(
        redis_url: str, tmp_path: Path) -> None:
    """Admission saw room; while the request waited in the stalled engine another model took it.
    The engine's kv_exceeds_budget reaches the SDK as RejectedError("kv_exceeds_budget"), not
    worker_failure."""
    common: dict[str, Any] = {"hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate": 128,
                              "max_position_embeddings": 2048}
    served = make_model(tmp_path / "served", seed=1, **common)
    hog = make_model(tmp_path / "hog", seed=2, **common)
    with Engine(EngineConfig(n_threads=1)) as calc:
        fp_served, fp_hog = calc.footprint(served), calc.footprint(hog)
    block = fp_served.kv_block_bytes
    cap = fp_served.device_bytes(fp_served.n_layer) + fp_hog.device_bytes(fp_hog.n_layer) + 4 * block
    settings = load_settings(None, redis_url=redis_url, key_prefix="api", worker_id="api-worker",
                             device={"budget": int(cap / 0.9) + 2, "n_threads": 1},
                             models=[{"name": "served", "path": str(served), "residency": "resident"}])

    async def main() -> None:
        async with running_worker(settings) as (rt, eng, producer):
            # 6 blocks: fit the device now (admission passes), not once the hog is loaded (4 blocks left).
            n_tokens = 6 * 16
            assert eng.ledger().kv_capacity_bytes >= 6 * block
            eng.debug_stall(True)
            handle = await producer.submit("served", prompt_ids=[5] * (n_tokens - 8), max_tokens=8,
                                           ignore_eos=True)
            deadline = time.monotonic() + 60
            while rt.driver.run_for(handle.request_id) is None:
                assert time.monotonic() < deadline, "the worker never submitted the request"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(eng.load_model, "hog", hog, "auto", RESIDENT)
            assert eng.ledger().models["served"].kv_capacity_blocks == 4
            eng.debug_stall(False)
            with pytest.raises(RejectedError) as err:
                await handle.result(timeout=60)
            assert err.value.code == "kv_exceeds_budget", err.value
            assert err.value.details["engine_code"] == "kv_exceeds_budget"

    asyncio.run(main())


# -- health ----------------------------------------------------------------------------------------------


def test_engine_health_sees_a_stalled_step_thread(model_dirs: dict[str, Path]) -> None:
    with Engine(EngineConfig(budget_bytes=16 << 20, n_threads=1)) as eng:
        eng.load_model("m", model_dirs["llama"])
        eng.generate("m", [5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
        idle = eng.health()
        assert not idle.busy
        eng.debug_stall(True)
        eng.submit(eng.new_request_id(), "m", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        stalled = eng.health()
        assert stalled.busy
        assert eng.wait_events(0.2) == []  # nothing moves while stalled
        # The loop that finished the first request may count itself after the snapshot above;
        # from then on the stalled thread never loops.
        before = eng.health().n_loops
        assert eng.wait_events(0.2) == []
        assert eng.health().n_loops == before
        eng.debug_stall(False)
        n_done = 0
        while n_done == 0:
            n_done += sum(ev.kind == EventKind.done for ev in eng.wait_events(5.0))
        assert eng.health().n_loops > stalled.n_loops


def test_worker_heartbeat_expires_while_the_engine_is_stuck_and_returns_after(
        redis_url: str, model_dirs: dict[str, Path]) -> None:
    """The heartbeat key stays while the engine is idle (even with its thread blocked: nothing to do),
    expires once a request waits on a blocked engine thread, and is back once the thread moves.
    (The same worker's status document carries each model's footprint.)"""
    import redis

    from worker import status

    settings = load_settings(None, redis_url=redis_url, key_prefix="hb", worker_id="hb-worker",
                             heartbeat_ttl_s=0.4, device={"budget": 16 << 20, "n_threads": 1},
                             models=[{"name": "m", "path": str(model_dirs["llama"])}])
    sync = redis.Redis.from_url(redis_url)

    def alive() -> bool:
        return status.heartbeats(sync, "hb", ["hb-worker"])["hb-worker"]

    def probe() -> int:  # what deploy/k8s/worker.yaml runs
        cmd = [str(Path(sys.executable).with_name("layermux")), "status", "--alive", "hb-worker",
               "--redis-url", redis_url, "--prefix", "hb"]
        return subprocess.run(cmd, capture_output=True, text=True, check=False).returncode

    async def wait_for(want: bool) -> None:
        deadline = time.monotonic() + 60
        while alive() != want:
            assert time.monotonic() < deadline, f"heartbeat never became {want}"
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with running_worker(settings) as (rt, eng, producer):
            await wait_for(True)
            await rt.report_stats_once()  # the status document (`layermux status --json`) shows the footprint
            shown = status.collect(sync, "hb")["workers"]["hb-worker"]["models"]["m"]["footprint"]
            fp = eng.models()["m"].footprint
            assert (shown["head_bytes"], shown["layer_bytes"], shown["kv_block_bytes"]) == (
                fp.head_bytes, fp.layer_bytes, fp.kv_block_bytes)
            eng.debug_stall(True)  # idle: a blocked thread with nothing to do is healthy
            for _ in range(3):
                assert await rt.heartbeat_once()
            handle = await producer.submit("m", prompt_ids=[5, 6, 7], max_tokens=4, ignore_eos=True)
            await wait_for(False)  # busy and standing still: the key expires
            assert not await rt.heartbeat_once()
            assert await asyncio.to_thread(probe) == 1  # the liveness probe fails
            snapshot = status.collect(sync, "hb")
            assert snapshot["workers"]["hb-worker"]["heartbeat"] is False
            eng.debug_stall(False)
            result = await handle.result(timeout=60)
            assert len(result.token_ids) == 4
            await wait_for(True)
            assert await asyncio.to_thread(probe) == 0
        assert not alive()  # a drained worker leaves no heartbeat behind

    try:
        asyncio.run(main())
    finally:
        sync.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        STUB.write_text(generate_stub(Path(d)))
    print(f"wrote {STUB.relative_to(ROOT)}")
