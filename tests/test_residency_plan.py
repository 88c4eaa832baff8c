"""The equal-share residency plan (engine/src/footprint.h, engine._core.plan_slots): exact expectations
and invariants of the pure function, and the case it exists for — a worker whose models load one by one under
`auto` would refuse one of them, while with the plan it loads and serves every model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import (
    MIN_SLOTS,
    CapacityError,
    Engine,
    EngineConfig,
    ModelFootprint,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
    plan_slots,
)
from producer_sdk.client import AsyncProducer
from tools.model_factory import make_model
from worker.runtime import Runtime
from worker.settings import load_settings

MiB = 1 << 20


def fp(n_layer: int, layer_mib: float, head_mib: float, ws_mib: float = 0.0) -> ModelFootprint:
    return ModelFootprint(n_layer=n_layer, layer_bytes=int(layer_mib * MiB), head_bytes=int(head_mib * MiB),
                          workspace_bytes=int(ws_mib * MiB))


def test_everything_resident_when_it_fits() -> None:
    f = {"a": fp(4, 1, 1), "b": fp(8, 2, 1)}
    assert plan_slots(f, cap_bytes=30 * MiB, kv_room_bytes=8 * MiB) == {"a": 4, "b": 8}


def test_none_when_the_minimums_do_not_fit() -> None:
    f = {"a": fp(4, 1, 1), "b": fp(8, 2, 1)}
    need = sum(x.device_bytes(MIN_SLOTS) for x in f.values())
    assert plan_slots(f, cap_bytes=need + 5, kv_room_bytes=6) is None
    assert plan_slots(f, cap_bytes=need + 5, kv_room_bytes=5) == {"a": 2, "b": 2}


def test_reference_shapes_at_half_their_weights_get_equal_shares() -> None:
    """SmolLM2-360M, Qwen2-0.5B, Llama-3.2-1B (bf16 heads and layers, MiB), workspaces of ~20 MiB."""
    f = {"smol": fp(32, 18.8, 90, 20), "qwen": fp(24, 28.4, 260, 20), "llama": fp(16, 116, 501, 20)}
    weights = sum(x.weight_bytes for x in f.values())
    cap = int(weights * 0.5 * 0.9)
    plan = plan_slots(f, cap_bytes=cap, kv_room_bytes=84 * MiB)
    assert plan is not None
    shares = {n: plan[n] / f[n].n_layer for n in f}
    assert all(s < 1 for s in shares.values())  # nobody resident, everybody streams
    assert max(shares.values()) - min(shares.values()) < 0.15, shares
    assert sum(f[n].device_bytes(plan[n]) for n in f) + 84 * MiB <= cap


@given(
    layers=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 64), st.integers(0, 256), st.integers(0, 64)),
                    min_size=1, max_size=4),
    cap_kib=st.integers(0, 1 << 16), kv_kib=st.integers(0, 1 << 12),
)
def test_plan_invariants(layers: list[tuple[int, int, int, int]], cap_kib: int, kv_kib: int) -> None:
    f = {f"m{i}": ModelFootprint(n_layer=n, layer_bytes=lb * 1024, head_bytes=hb * 1024, workspace_bytes=wb * 1024)
         for i, (n, lb, hb, wb) in enumerate(layers)}
    cap, kv = cap_kib * 1024, kv_kib * 1024
    plan = plan_slots(f, cap, kv)
    minimum = kv + sum(x.device_bytes(MIN_SLOTS) for x in f.values())
    if plan is None:
        assert minimum > cap
        return
    used = kv + sum(f[n].device_bytes(s) for n, s in plan.items())
    assert used <= cap
    for n, s in plan.items():
        assert min(MIN_SLOTS, f[n].n_layer) <= s <= f[n].n_layer
        # Greedy: a model left short could not take one more layer within the cap.
        if s < f[n].n_layer:
            assert used + f[n].layer_bytes > cap or any(
                plan[o] / f[o].n_layer < s / f[n].n_layer for o in plan if plan[o] < f[o].n_layer)


# -- the worker ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-models")
    common: dict[str, Any] = {"n_heads": 4, "n_kv_heads": 2, "max_position_embeddings": 512}
    return {
        # many thin layers: small minimum, but it fits resident and would take the room...
        "thin": make_model(root / "thin", hidden=128, n_layers=16, intermediate=512, seed=1, **common),
        # ...that a few fat layers need just to load.
        "fat": make_model(root / "fat", hidden=256, n_layers=6, intermediate=768, seed=2, **common),
    }


def test_worker_plan_loads_models_that_one_by_one_auto_would_refuse(
        redis_url: str, two_models: dict[str, Path]) -> None:
    with Engine(EngineConfig(n_threads=1)) as calc:
        fps = {n: calc.footprint(p) for n, p in two_models.items()}
    thin, fat = fps["thin"], fps["fat"]
    # The smallest cap at which `thin` alone loads resident next to the 25 % KV reserve.
    cap = int((thin.weight_bytes + thin.workspace_bytes) / 0.75) + 64 * 1024
    budget = int(cap / 0.9) + 1
    cap = int(budget * 0.9)
    assert cap - thin.weight_bytes - thin.workspace_bytes < fat.device_bytes(MIN_SLOTS)  # fat cannot follow
    assert plan_slots(fps, cap, int(cap * 0.25)) is not None  # but a plan fits both

    # One by one, as the engine alone decides: `fat` is refused.
    with Engine(EngineConfig(budget_bytes=budget, n_threads=1)) as eng:
        assert eng.load_model("thin", two_models["thin"]).resident
        with pytest.raises(CapacityError):
            eng.load_model("fat", two_models["fat"])

    settings = load_settings(None, redis_url=redis_url, key_prefix="plan", worker_id="plan-worker",
                             stats_interval_s=0.2, device={"budget": budget, "n_threads": 1},
                             models=[{"name": n, "path": str(p)} for n, p in two_models.items()])

    async def main() -> None:
        rt = Runtime(settings)
        producer = AsyncProducer(redis_url, prefix="plan")
        try:
            await rt.start()
            assert rt.driver.eng is not None
            info = rt.driver.eng.models()
            assert set(info) == {"thin", "fat"}
            assert not info["thin"].resident or not info["fat"].resident
            ledger = rt.driver.ledger()
            assert ledger["used_bytes"] <= ledger["cap_bytes"]
            for name in two_models:
                result = await (await producer.submit(name, prompt_ids=[5, 6, 7], max_tokens=4,
                                                      ignore_eos=True)).result(timeout=120)
                assert len(result.token_ids) == 4
        finally:
            await rt.drain(timeout_s=10)
            await producer.aclose()

    asyncio.run(main())


def test_plan_changes_no_token(two_models: dict[str, Path]) -> None:
    """Streamed through planned slots or resident: the same greedy tokens."""
    outs = []
    for residency, slots in ((ResidencyMode.resident, 0), (ResidencyMode.streamed, MIN_SLOTS)):
        with Engine(EngineConfig(budget_bytes=256 * MiB, n_threads=1)) as eng:
            eng.load_model("fat", two_models["fat"], options=ModelLoadOptions(residency=residency, stream_slots=slots))
            outs.append(eng.generate("fat", [3, 4, 5, 6], SamplingParams(max_tokens=6, temperature=0.0,
                                                                        ignore_eos=True)))
    assert outs[0] == outs[1]
