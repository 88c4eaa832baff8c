"""The Python facade of the C++ engine: the Engine, and the engine's types re-exported.

Owner: engine facade. Every type that crosses into C++ is the compiled module's own
(engine._core, typed by engine/_core.pyi): EngineConfig, SamplingParams, ModelLoadOptions,
the enums, EngineEvent, ModelInfo, ModelFootprint, LedgerSnapshot, EngineStats, EngineHealth.
Their defaults are written once, in the C++ headers; nothing here re-declares them.
Thread-safety: an Engine may be used from several threads: the C++ side is thread-safe, and
this wrapper's only state (the id counter and the events held back by generate()) is guarded
by a lock. Long calls release the GIL.
"""

from __future__ import annotations

import itertools
import select
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt

from engine import _core
from engine._core import (
    MIN_SLOTS,
    CopyTrace,
    EngineConfig,
    EngineEvent,
    EngineHealth,
    EngineStats,
    ErrorCode,
    EventKind,
    Eviction,
    FinishReason,
    LedgerSnapshot,
    MatmulPrecision,
    ModelFootprint,
    ModelInfo,
    ModelLoadOptions,
    ModelPlacement,
    OwnerUsage,
    ResidencyMode,
    ResidencyStats,
    SamplingParams,
    StepTrace,
    Trace,
    WaitTrace,
    kernels_isa,
    plan_slots,
    trace_now_us,
)
from engine.errors import RequestFailedError
from engine.hf_config import load_spec

__all__ = [
    "MIN_SLOTS",
    "CopyTrace",
    "Engine",
    "EngineConfig",
    "EngineEvent",
    "EngineHealth",
    "EngineStats",
    "ErrorCode",
    "EventKind",
    "Eviction",
    "FinishReason",
    "LedgerSnapshot",
    "MatmulPrecision",
    "ModelFootprint",
    "ModelInfo",
    "ModelLoadOptions",
    "ModelPlacement",
    "OwnerUsage",
    "ResidencyMode",
    "ResidencyStats",
    "SamplingParams",
    "StepTrace",
    "Trace",
    "WaitTrace",
    "kernels_isa",
    "plan_slots",
    "trace_now_us",
]

ModelRef = tuple[str, str | Path, str]  # (name, model folder, weights: "auto" | "f16" | ...)


class Engine:
    """A running engine: one device budget, any number of loaded models, one step thread."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config if config is not None else EngineConfig()
        self._core = _core.Engine(self.config)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._held: list[EngineEvent] = []
        self._closed = False

    # ---- models ----
    def load_model(
        self,
        name: str,
        path: str | Path,
        weights: str = "auto",
        options: ModelLoadOptions | None = None,
        *,
        max_context: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelInfo:
        """Loads a Hugging Face model folder. Blocking (GIL released): in asyncio use asyncio.to_thread."""
        spec = load_spec(path, name, weights, max_context)
        return self._core.load_model(spec, options if options is not None else ModelLoadOptions(), progress)

    def unload_model(self, name: str) -> None:
        self._core.unload_model(name)

    def footprint(self, path: str | Path, weights: str = "auto", *, max_context: int | None = None) -> ModelFootprint:
        """What the model would cost on this engine (head, each layer, workspace, KV per token and
        block), read from its headers: nothing is loaded or booked."""
        return self._core.footprint(load_spec(path, "footprint", weights, max_context))

    def plan_residency(self, models: Sequence[ModelRef], *,
                       max_context: int | None = None) -> list[ModelPlacement] | None:
        """One equal-share placement of several models (engine/src/footprint.h) against the ledger's
        headroom now; None when even their minimums do not fit."""
        return self._core.plan_residency([load_spec(p, n, w, max_context) for n, p, w in models])

    def models(self) -> dict[str, ModelInfo]:
        return {m.name: m for m in self._core.models()}

    # ---- requests ----
    def new_request_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def submit(self, req_id: int, model: str, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               capture_logits: bool = False) -> None:
        self._core.submit(req_id, model, list(prompt_ids), params if params is not None else SamplingParams(),
                          capture_logits)

    def cancel(self, req_id: int) -> None:
        self._core.cancel(req_id)

    def fileno(self) -> int:
        """An eventfd that is readable while events are pending (for loop.add_reader / select)."""
        return self._core.event_fd()

    def drain_events(self) -> list[EngineEvent]:
        with self._lock:
            held, self._held = self._held, []
        return held + self._core.drain_events()

    def wait_events(self, timeout_s: float | None = None) -> list[EngineEvent]:
        """Blocks until at least one event is pending (or the timeout passes)."""
        with self._lock:
            if self._held:
                held, self._held = self._held, []
                return held
        select.select([self.fileno()], [], [], timeout_s)
        return self.drain_events()

    def generate(self, model: str, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> list[int]:
        """Runs one request to completion and returns its generated ids (events of others are kept).
        Raises RequestFailedError (with the engine's ErrorCode) when the request fails."""
        return self._run(model, prompt_ids, params if params is not None else SamplingParams(), False)[0]

    def debug_logits(self, model: str, prompt_ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Last-position logits [n_vocab] (float32) of the prompt — for parity tests."""
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        return self._run(model, prompt_ids, params, True)[1]

    def _run(self, model: str, prompt_ids: Sequence[int], params: SamplingParams,
             capture_logits: bool) -> tuple[list[int], npt.NDArray[np.float32]]:
        rid = self.new_request_id()
        self.submit(rid, model, prompt_ids, params, capture_logits)
        tokens: list[int] = []
        while True:
            others: list[EngineEvent] = []
            try:
                for ev in self.wait_events(1.0):
                    if ev.req_id != rid:
                        others.append(ev)
                    elif ev.kind == EventKind.token:
                        tokens.append(ev.token_id)
                    elif ev.kind == EventKind.error:
                        raise RequestFailedError(ev.error_code, ev.message)
                    else:
                        logits = self._core.take_logits(rid) if capture_logits else np.zeros(0, np.float32)
                        return tokens, logits
            finally:
                if others:  # other requests' events, for the next drain
                    with self._lock:
                        self._held[:0] = others

    # ---- introspection ----
    def ledger(self) -> LedgerSnapshot:
        return self._core.ledger()

    def device_summary(self) -> str:
        """The device: its kind, and for a GPU its name, driver, device-local heap and transfer queue."""
        return str(self._core.device_summary())

    def kv_bytes_for(self, model: str, n_tokens: int) -> int:
        return self._core.kv_bytes_for(model, n_tokens)

    def stats(self) -> EngineStats:
        return self._core.stats()

    def health(self) -> EngineHealth:
        return self._core.health()

    def trace_enable(self, capacity: int) -> None:
        """Record the step trace (engine/src/trace.h): at most `capacity` steps, copies and waits each, the oldest
        dropped beyond it; 0 stops. Either way, what was recorded before is discarded. Off by default."""
        self._core.trace_enable(capacity)

    def trace_take(self) -> Trace:
        """What the trace recorded since it was enabled or last taken (times: trace_now_us's clock); empties it."""
        return self._core.trace_take()

    def n_threads(self) -> int:
        """Compute threads in use (config.n_threads resolved: 0 = one per usable core)."""
        return self._core.n_threads()

    def debug_stall(self, on: bool) -> None:
        """Test and bench hook: blocks (True) or releases (False) the step thread at the top of its loop, so
        requests submitted meanwhile all reach its next step (bench/multimodel.py)."""
        self._core.debug_stall(on)

    # ---- lifetime ----
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._core.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
