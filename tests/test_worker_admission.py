"""The worker's admission policy (worker/admission.py) as pure functions: invariants by hypothesis,
exact expectations by example."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.admission import (
    MIN_RESERVATION_BLOCKS,
    DeviceView,
    ModelLoad,
    ReadVerdict,
    check_request,
    fair_share_bytes,
    kv_tokens_needed,
    min_reservation_tokens,
    read_verdict,
)

NAMES = ("a", "b", "c")


@st.composite
def device_views(draw: st.DrawFn) -> DeviceView:
    models = {}
    for name in NAMES[: draw(st.integers(1, 3))]:
        max_running = draw(st.integers(1, 8))
        models[name] = ModelLoad(
            running=draw(st.integers(0, max_running)),
            max_running=max_running,
            kv_bytes=draw(st.integers(0, 1 << 20)),
            min_reservation_bytes=draw(st.integers(1, 1 << 16)),
            sched_weight=draw(st.floats(0.1, 10.0)),
            waiting=draw(st.integers(0, 50)),
        )
    return DeviceView(headroom_bytes=draw(st.integers(-(1 << 10), 1 << 20)), models=models)


@given(device_views(), st.sampled_from(NAMES))
def test_read_gate_never_opens_past_max_running_or_without_a_reservation(view: DeviceView, model: str) -> None:
    if model not in view.models:
        return
    if read_verdict(model, view) is ReadVerdict.OK:
        me = view.models[model]
        assert me.running < me.max_running
        assert view.headroom_bytes >= me.min_reservation_bytes


@settings(max_examples=200)
@given(
    cap=st.integers(1 << 12, 1 << 22),
    reservations=st.lists(st.integers(1, 1 << 14), min_size=3, max_size=3),
    max_running=st.lists(st.integers(1, 6), min_size=3, max_size=3),
    weights=st.lists(st.floats(0.5, 4.0), min_size=3, max_size=3),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 1 << 14)), max_size=200),
)
def test_simulated_reads_never_book_past_the_cap_nor_exceed_max_running(
    cap: int, reservations: list[int], max_running: list[int], weights: list[float],
    steps: list[tuple[bool, int, int]],
) -> None:
    """A device where each admitted request books its reservation plus some growth that the engine
    grants only within the headroom (it preempts instead of overbooking)."""
    booked: dict[str, list[int]] = {n: [] for n in NAMES}
    for is_read, i, growth in steps:
        name = NAMES[i]
        used = sum(sum(v) for v in booked.values())
        view = DeviceView(
            headroom_bytes=cap - used,
            models={n: ModelLoad(running=len(booked[n]), max_running=max_running[k],
                                 kv_bytes=sum(booked[n]), min_reservation_bytes=reservations[k],
                                 sched_weight=weights[k], waiting=5)
                    for k, n in enumerate(NAMES)})
        if is_read:
            if read_verdict(name, view) is ReadVerdict.OK:
                booked[name].append(reservations[i] + min(growth, cap - used - reservations[i]))
        elif booked[name]:
            booked[name].pop(0)
        assert sum(sum(v) for v in booked.values()) <= cap
        for k, n in enumerate(NAMES):
            assert len(booked[n]) <= max_running[k]


def test_read_gate_reasons() -> None:
    me = ModelLoad(running=2, max_running=2, kv_bytes=0, min_reservation_bytes=100)
    assert read_verdict("a", DeviceView(10_000, {"a": me})) is ReadVerdict.MAX_RUNNING
    me = ModelLoad(running=0, max_running=2, kv_bytes=0, min_reservation_bytes=100)
    assert read_verdict("a", DeviceView(99, {"a": me})) is ReadVerdict.NO_HEADROOM
    assert read_verdict("a", DeviceView(100, {"a": me})) is ReadVerdict.OK


def test_a_lone_model_may_use_the_whole_device() -> None:
    hot = ModelLoad(running=5, max_running=64, kv_bytes=9_000, min_reservation_bytes=100)
    idle = ModelLoad(running=0, max_running=64, kv_bytes=0, min_reservation_bytes=100, waiting=0)
    assert read_verdict("hot", DeviceView(150, {"hot": hot, "idle": idle})) is ReadVerdict.OK


def test_hot_model_over_its_share_leaves_the_last_reservation_to_a_starving_model() -> None:
    hot = ModelLoad(running=5, max_running=64, kv_bytes=9_000, min_reservation_bytes=100, waiting=40)
    cold = ModelLoad(running=0, max_running=64, kv_bytes=0, min_reservation_bytes=100, waiting=3)
    view = DeviceView(150, {"hot": hot, "cold": cold})
    assert fair_share_bytes("hot", view) == (150 + 9_000) // 2
    assert read_verdict("hot", view) is ReadVerdict.FAIR_SHARE
    assert read_verdict("cold", view) is ReadVerdict.OK
    # With room for both reservations the hot model reads on.
    assert read_verdict("hot", DeviceView(200, {"hot": hot, "cold": cold})) is ReadVerdict.OK


def test_weights_set_the_shares() -> None:
    a = ModelLoad(running=1, max_running=8, kv_bytes=600, min_reservation_bytes=100, sched_weight=3.0, waiting=1)
    b = ModelLoad(running=1, max_running=8, kv_bytes=100, min_reservation_bytes=100, sched_weight=1.0, waiting=1)
    view = DeviceView(100, {"a": a, "b": b})
    assert fair_share_bytes("a", view) == 600
    assert fair_share_bytes("b", view) == 200
    assert read_verdict("a", view) is ReadVerdict.FAIR_SHARE  # at its share, and b starves
    assert read_verdict("b", view) is ReadVerdict.OK


@given(
    prompt_tokens=st.integers(0, 10_000),
    max_tokens=st.integers(1, 10_000),
    n_ctx=st.integers(1, 8192),
    max_tokens_limit=st.integers(1, 8192),
    kv_per_token=st.integers(1, 4096),
    cap=st.integers(1, 1 << 26),
)
def test_request_check_admits_only_what_fits(
    prompt_tokens: int, max_tokens: int, n_ctx: int, max_tokens_limit: int, kv_per_token: int, cap: int,
) -> None:
    needed = kv_per_token * (prompt_tokens + max_tokens)
    denial = check_request(prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=n_ctx,
                           max_tokens_limit=max_tokens_limit, needed_kv_bytes=needed, cap_bytes=cap)
    fits = max_tokens <= max_tokens_limit and prompt_tokens + max_tokens <= n_ctx and needed <= cap
    assert (denial is None) == fits
    if denial is not None:
        assert denial.code in ("max_tokens_over_limit", "prompt_too_long", "kv_exceeds_budget")
        assert all(isinstance(v, int) for v in denial.details.values())


def test_request_check_numbers_for_each_code() -> None:
    d = check_request(prompt_tokens=10, max_tokens=5000, n_ctx=8192, max_tokens_limit=4096,
                      needed_kv_bytes=1, cap_bytes=10)
    assert d is not None and d.code == "max_tokens_over_limit"
    assert d.details == {"needed": 5000, "limit": 4096}
    d = check_request(prompt_tokens=300, max_tokens=1, n_ctx=256, max_tokens_limit=4096,
                      needed_kv_bytes=1, cap_bytes=10)
    assert d is not None and d.code == "prompt_too_long"
    assert (d.details["needed_tokens"], d.details["limit_tokens"]) == (300, 256)
    d = check_request(prompt_tokens=200, max_tokens=100, n_ctx=256, max_tokens_limit=4096,
                      needed_kv_bytes=1, cap_bytes=10)
    assert d is not None and d.code == "prompt_too_long"
    assert (d.details["needed_tokens"], d.details["limit_tokens"]) == (300, 256)
    d = check_request(prompt_tokens=200, max_tokens=50, n_ctx=256, max_tokens_limit=4096,
                      needed_kv_bytes=5000, cap_bytes=4000)
    assert d is not None and d.code == "kv_exceeds_budget"
    assert (d.details["needed_bytes"], d.details["available_bytes"], d.details["limit_bytes"]) == (5000, 4000, 4000)
    assert check_request(prompt_tokens=200, max_tokens=56, n_ctx=256, max_tokens_limit=4096,
                         needed_kv_bytes=4000, cap_bytes=4000) is None
    # Weights and workspaces booked for good leave KV less than the cap.
    d = check_request(prompt_tokens=200, max_tokens=56, n_ctx=256, max_tokens_limit=4096,
                      needed_kv_bytes=4000, cap_bytes=4000, kv_capacity_bytes=3000)
    assert d is not None and d.code == "kv_exceeds_budget"
    assert (d.details["needed_bytes"], d.details["available_bytes"], d.details["limit_bytes"]) == (4000, 3000, 4000)


def test_reservation_and_kv_need_helpers() -> None:
    assert min_reservation_tokens(16) == 16 * MIN_RESERVATION_BLOCKS
    assert kv_tokens_needed(100, 50, 128) == 128
    assert kv_tokens_needed(10, 50, 128) == 60


@settings(max_examples=300, deadline=None)
# Found by Hypothesis: c goes over its share leaving one reservation each for a and b, then a
# (under its share) takes eight small ones and b never fits. Under-share models now also leave
# room for every model more starved than themselves.
@example(cap=4096, reservations=[1, 609, 581], max_running=[8, 4, 6], weights=[1.0, 4.0, 4.0],
         durations=[1], orders=[["c", "a", "b"]], late_start=0)
@given(
    cap=st.integers(1 << 12, 1 << 20),
    reservations=st.lists(st.integers(1, 1 << 12), min_size=3, max_size=3),
    max_running=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    weights=st.lists(st.floats(0.5, 4.0), min_size=3, max_size=3),
    durations=st.lists(st.integers(1, 6), min_size=1, max_size=64),
    orders=st.lists(st.permutations(list(NAMES)), min_size=1, max_size=16),
    late_start=st.integers(0, 10),
)
def test_no_model_with_backlog_waits_longer_than_the_longest_request(
    cap: int, reservations: list[int], max_running: list[int], weights: list[float], durations: list[int],
    orders: list[list[str]], late_start: int,
) -> None:
    """Starvation bound. Models a and c are flooded (always waiting); b's backlog appears at tick
    `late_start`. Each tick, finished requests free their reservation, then the models (in a drawn
    order) read while the gate says OK; a request holds its reservation for a drawn number of ticks
    (1..D). Stated bound: while b has backlog and room under its max_running, it reads within
    D + 1 ticks — provided every reservation fits within its model's weighted share of the cap
    (otherwise the model can never be guaranteed a start, and check_request-like sizing applies)."""
    total_w = sum(weights)
    if any(r > cap * w / total_w for r, w in zip(reservations, weights)):
        return
    longest = max(durations)
    running: dict[str, list[int]] = {n: [] for n in NAMES}  # end ticks
    b_waiting_since: int | None = None
    n_draw = 0
    for tick in range(late_start + 8 * (longest + 1)):
        for n in NAMES:
            running[n] = [end for end in running[n] if end > tick]
        waiting = {"a": 50, "b": 50 if tick >= late_start else 0, "c": 50}
        if tick >= late_start and b_waiting_since is None:
            b_waiting_since = tick
        for name in orders[tick % len(orders)]:
            while waiting[name] > 0:
                used = sum(reservations[NAMES.index(n)] * len(running[n]) for n in NAMES)
                view = DeviceView(
                    headroom_bytes=cap - used,
                    models={n: ModelLoad(running=len(running[n]), max_running=max_running[j],
                                         kv_bytes=reservations[j] * len(running[n]),
                                         min_reservation_bytes=reservations[j], sched_weight=weights[j],
                                         waiting=waiting[n])
                            for j, n in enumerate(NAMES)})
                if read_verdict(name, view) is not ReadVerdict.OK:
                    break
                running[name].append(tick + durations[n_draw % len(durations)])
                n_draw += 1
                if name == "b":
                    b_waiting_since = tick + 1  # served; the next b request waits from the next tick
        if b_waiting_since is not None and len(running["b"]) < max_running[1]:
            assert tick - b_waiting_since <= longest + 1, (tick, b_waiting_since, running)
        elif len(running["b"]) >= max_running[1]:
            b_waiting_since = tick + 1  # at its own limit: not starving, just full
