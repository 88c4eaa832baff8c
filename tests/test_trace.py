"""The step trace (engine/src/trace.h, Engine.trace_enable / trace_take): one record per step taken, with its model,
sequences and tokens; every copy into device memory with its bytes, adding up to what ResidencyStats counted; the
waits of compute on copies; nothing while it is off; a bounded ring that drops the oldest records.

Real engine, real files (random models written by tools.model_factory). No assertion on durations: times are only
checked for order (a step ends after it starts; steps of the one step thread do not overlap).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine import (
    Engine,
    EngineConfig,
    EventKind,
    LayermuxError,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
    Trace,
)

N_LAYERS = 6
STREAMED = ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=2)
RESIDENT = ModelLoadOptions(residency=ResidencyMode.resident)
SWAP = ModelLoadOptions(residency=ResidencyMode.swap)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.model_factory import make_model

    root = tmp_path_factory.mktemp("trace-model")
    return make_model(root / "m", arch="llama", hidden=64, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2,
                      intermediate=128, seed=5, init_std=0.2)


def _serve(eng: Engine, models: list[str], n_per_model: int = 2, max_tokens: int = 5) -> None:
    """Submits n_per_model requests to each model at once and waits until all are done."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    open_ids: set[int] = set()
    for i, name in enumerate(models):
        for j in range(n_per_model):
            rid = eng.new_request_id()
            eng.submit(rid, name, [(7 * i + 3 * j + k) % 200 + 3 for k in range(4 + 3 * j)], params)
            open_ids.add(rid)
    while open_ids:
        for ev in eng.wait_events(10.0):
            assert ev.kind != EventKind.error, ev.message
            if ev.kind == EventKind.done:
                open_ids.discard(ev.req_id)


def _traced_run(model_dir: Path, prefetch_depth: int) -> tuple[Engine, Trace, dict[str, int], dict[str, int]]:
    """A streamed and a resident model served together with the trace on from after loading. Returns the engine
    (closed), the trace, the model ids, and the stats deltas over the run."""
    eng = Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2, prefetch_depth=prefetch_depth))
    with eng:
        eng.load_model("s", model_dir, options=STREAMED)
        eng.load_model("r", model_dir, options=RESIDENT)
        ids = {name: info.id for name, info in eng.models().items()}
        st0 = eng.stats()
        eng.trace_enable(10_000)
        _serve(eng, ["s", "r"])
        trace = eng.trace_take()
        st1 = eng.stats()
    delta = {"n_steps": st1.n_steps - st0.n_steps,
             "n_tokens_computed": st1.n_tokens_computed - st0.n_tokens_computed,
             "n_tokens_generated": st1.n_tokens_generated - st0.n_tokens_generated,
             "bytes_copied": st1.residency.bytes_copied - st0.residency.bytes_copied,
             "n_loads": st1.residency.n_loads - st0.residency.n_loads}
    return eng, trace, ids, delta


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_trace_records_every_step_taken_with_its_model_sequences_and_tokens(model_dir: Path,
                                                                            prefetch_depth: int) -> None:
    _, trace, ids, delta = _traced_run(model_dir, prefetch_depth)
    steps = trace.steps
    assert trace.n_dropped == 0
    assert len(steps) == delta["n_steps"] > 0
    assert [s.index for s in steps] == list(range(steps[0].index, steps[0].index + len(steps)))
    assert sum(s.n_tokens for s in steps) == delta["n_tokens_computed"]
    assert sum(s.n_generated for s in steps) == delta["n_tokens_generated"] == 2 * 2 * 5
    assert {s.model for s in steps} == set(ids.values())
    assert all(1 <= s.n_seqs <= 2 and s.n_tokens >= s.n_seqs for s in steps)
    assert all(s.start_us <= s.end_us for s in steps)
    assert all(a.end_us <= b.start_us for a, b in itertools.pairwise(steps))


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_bytes_copied_in_the_trace_add_up_to_the_residency_stats(model_dir: Path, prefetch_depth: int) -> None:
    _, trace, _, delta = _traced_run(model_dir, prefetch_depth)
    assert delta["bytes_copied"] > 0
    assert sum(c.n_bytes for c in trace.copies) == delta["bytes_copied"]
    assert sum(c.n_units for c in trace.copies) == delta["n_loads"]
    # Each copy lands in one step's window (after the previous step's end, by its own end): the steps' figures
    # add up to the same bytes once the run is over.
    assert sum(s.bytes_copied for s in trace.steps) == delta["bytes_copied"]
    assert sum(s.n_units_copied for s in trace.steps) == delta["n_loads"]
    assert all(c.start_us <= c.end_us for c in trace.copies)


def test_a_streamed_model_shows_copies_and_waits_and_a_resident_one_none_after_load(model_dir: Path) -> None:
    _, trace, ids, _ = _traced_run(model_dir, prefetch_depth=0)
    s, r = ids["s"], ids["r"]
    assert {c.model for c in trace.copies} == {s}
    # Two slots for six layers: every step of the streamed model copies at least four of them; the head stays
    # resident (unit N_LAYERS) and is never copied after load.
    assert sorted({c.unit for c in trace.copies}) == list(range(N_LAYERS))
    # On demand (no copy thread) every copy is a wait of the streamed model's own step.
    assert {w.model for w in trace.waits} == {s}
    assert len(trace.waits) == len(trace.copies)
    for st in trace.steps:
        if st.model == r:
            assert st.n_units_copied == 0 and st.copy_wait_us == 0
        else:
            assert N_LAYERS - 2 <= st.n_units_copied <= N_LAYERS


def test_steps_carry_the_schedulers_turns(model_dir: Path) -> None:
    with Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2)) as eng:
        eng.load_model("s1", model_dir, options=STREAMED)
        eng.load_model("s2", model_dir, options=STREAMED)
        st0 = eng.stats()
        eng.trace_enable(10_000)
        _serve(eng, ["s1", "s2"], n_per_model=3, max_tokens=8)
        steps = eng.trace_take().steps
        st1 = eng.stats()
    assert steps[0].new_turn
    assert sum(s.new_turn for s in steps) == st1.n_turns - st0.n_turns > 1
    assert sum(s.new_turn and s.borrowed for s in steps) == st1.n_borrow_turns - st0.n_borrow_turns
    for a, b in itertools.pairwise(steps):  # a turn goes on with the same model and the same loans
        if not b.new_turn:
            assert (b.model, b.borrowed) == (a.model, a.borrowed)


def test_a_whole_model_swap_is_one_copy_of_every_unit_and_a_wait(model_dir: Path) -> None:
    with Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2)) as eng:
        eng.load_model("a", model_dir, options=SWAP)
        eng.load_model("b", model_dir, options=SWAP)
        ids = {name: info.id for name, info in eng.models().items()}
        eng.trace_enable(1000)
        st0 = eng.stats().residency
        _serve(eng, ["a", "b"], n_per_model=1)
        trace = eng.trace_take()
        st1 = eng.stats().residency
    assert trace.copies, "each model is swapped in at least once"
    assert all(c.unit == -1 and c.n_units == N_LAYERS + 1 for c in trace.copies)  # its layers and its head
    assert {c.model for c in trace.copies} == set(ids.values())
    assert sum(c.n_bytes for c in trace.copies) == st1.bytes_copied - st0.bytes_copied
    assert [(w.model, w.start_us, w.end_us) for w in trace.waits] == [
        (c.model, c.start_us, c.end_us) for c in trace.copies]


def test_trace_off_records_nothing(model_dir: Path) -> None:
    with Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2)) as eng:
        eng.load_model("s", model_dir, options=STREAMED)
        _serve(eng, ["s"])  # never enabled
        assert eng.stats().residency.bytes_copied > 0
        t = eng.trace_take()
        assert (t.steps, t.copies, t.waits, t.n_dropped) == ([], [], [], 0)
        eng.trace_enable(100)
        eng.trace_enable(0)  # turned off again: what follows is not recorded
        _serve(eng, ["s"])
        t = eng.trace_take()
        assert (t.steps, t.copies, t.waits, t.n_dropped) == ([], [], [], 0)


def test_a_full_ring_keeps_the_newest_records_and_counts_the_dropped(model_dir: Path) -> None:
    with Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2, prefetch_depth=0)) as eng:
        eng.load_model("s", model_dir, options=STREAMED)
        st0 = eng.stats()
        eng.trace_enable(3)
        _serve(eng, ["s"], n_per_model=1, max_tokens=6)
        t = eng.trace_take()
        st1 = eng.stats()
    n0, n_steps = st0.n_steps, st1.n_steps - st0.n_steps
    n_copies = st1.residency.n_loads - st0.residency.n_loads  # on demand: each copy is also one wait
    assert n_steps > 3 and n_copies > 3
    assert [s.index for s in t.steps] == [n0 + n_steps - 3, n0 + n_steps - 2, n0 + n_steps - 1]
    assert len(t.copies) == len(t.waits) == 3
    assert t.n_dropped == (n_steps - 3) + 2 * (n_copies - 3)


def _no_vulkan() -> str | None:
    try:
        with Engine(EngineConfig(budget_bytes=16 << 20, device_kind="vulkan")):
            return None
    except LayermuxError as e:
        return str(e)


@pytest.mark.skipif(_no_vulkan() is not None, reason="no Vulkan device")
def test_on_a_gpu_the_steps_wait_is_the_devices_own_measure(model_dir: Path) -> None:
    with Engine(EngineConfig(budget_bytes=64 << 20, device_kind="vulkan", kv_dtype="f32")) as eng:
        eng.load_model("s", model_dir, options=STREAMED)
        st0 = eng.stats()
        eng.trace_enable(10_000)
        _serve(eng, ["s"], n_per_model=2, max_tokens=5)
        trace = eng.trace_take()
        st1 = eng.stats()
    wait_us = 1000 * (st1.residency.copy_wait_ms - st0.residency.copy_wait_ms)
    # Each step's figure is the device counter's difference over the step, truncated to whole microseconds.
    assert wait_us - len(trace.steps) <= sum(s.copy_wait_us for s in trace.steps) <= wait_us + 1
    assert sum(c.n_bytes for c in trace.copies) == st1.residency.bytes_copied - st0.residency.bytes_copied > 0
