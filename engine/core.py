"""The Python facade of the C++ engine: configuration, requests, events.

Owner: engine facade. An Engine may be used from several threads: the C++ side
is thread-safe, and this wrapper's only state (the id counter and the events
held back by generate()) is guarded by a lock. Long calls release the GIL.
"""

from __future__ import annotations

import itertools
import select
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from engine import _core
from engine.hf_config import load_spec


@dataclass(frozen=True)
class EngineConfig:
    """Device budget and engine knobs. budget_bytes is the whole device; the ledger's cap is cap_fraction of it."""

    budget_bytes: int = 1 << 30
    cap_fraction: float = 0.9
    n_threads: int = 0  # 0: all cores
    prefetch_depth: int = 2  # units the copy thread may run ahead of compute; 0 = no overlap
    eviction: str = "belady"  # or "lru"
    kv_block_tokens: int = 16
    max_batch_tokens: int = 512
    max_seqs_per_step: int = 64
    kv_reserve_fraction: float = 0.25
    # "exact": bitwise the same tokens on every CPU; "fast": bf16 weights use the CPU's bf16
    # dot product (AVX512_BF16) with activations rounded to bf16, and q8_0 / q4_0 models are
    # loaded repacked for int8 dot products (activations rounded to int8 per block of 32, as
    # llama.cpp does) — faster decode and prefill, not bitwise.
    matmul_precision: str = "exact"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    max_tokens: int = 16
    stop_token_ids: list[int] | None = None  # None: the model's EOS ids
    ignore_eos: bool = False

    def kwargs(self) -> dict[str, Any]:
        stops = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        return {
            "ignore_eos": self.ignore_eos or self.stop_token_ids is not None,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "stop_token_ids": stops,
        }


class EngineEvent(NamedTuple):
    req_id: int
    kind: str  # "token" | "done" | "error"
    token_id: int
    index: int  # generation index of token_id
    finish_reason: str  # done: "stop" | "length" | "cancelled"
    message: str  # error text
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float
    n_preempted: int


_KINDS = ("token", "done", "error")


def _event(t: tuple[Any, ...]) -> EngineEvent:
    req_id, kind, token, index, detail, prompt_tokens, prefill_ms, decode_ms, n_preempted = t
    k = _KINDS[kind]
    return EngineEvent(
        req_id, k, token, index, detail if k == "done" else "", detail if k == "error" else "",
        prompt_tokens, prefill_ms, decode_ms, n_preempted,
    )


@dataclass
class _Held:
    events: list[EngineEvent] = field(default_factory=list)


class Engine:
    """A running engine: one device budget, any number of loaded models, one step thread."""

    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        cfg = config or EngineConfig()
        if overrides:
            cfg = EngineConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        self._core = _core.Engine(
            budget_bytes=cfg.budget_bytes,
            cap_fraction=cfg.cap_fraction,
            n_threads=cfg.n_threads,
            prefetch_depth=cfg.prefetch_depth,
            eviction=cfg.eviction,
            kv_block_tokens=cfg.kv_block_tokens,
            max_batch_tokens=cfg.max_batch_tokens,
            max_seqs_per_step=cfg.max_seqs_per_step,
            kv_reserve_fraction=cfg.kv_reserve_fraction,
            matmul_precision=cfg.matmul_precision,
        )
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._held = _Held()
        self._closed = False

    # ---- models ----
    def load_model(
        self,
        name: str,
        path: str | Path,
        weights: str = "auto",
        sched_weight: float = 1.0,
        max_running: int = 64,
        residency: str = "auto",
        stream_slots: int = 0,
        max_context: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Loads a Hugging Face model folder. Blocking (GIL released): in asyncio use asyncio.to_thread."""
        spec = load_spec(path, name, weights, max_context)
        return dict(
            self._core.load_model(
                spec, residency=residency, sched_weight=sched_weight, max_running=max_running,
                stream_slots=stream_slots, progress=progress,
            )
        )

    def unload_model(self, name: str) -> None:
        self._core.unload_model(name)

    def models(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: dict(m) for m in self._core.models()}

    # ---- requests ----
    def new_request_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def submit(self, req_id: int, model: str, prompt_ids: list[int], params: SamplingParams | None = None,
               capture_logits: bool = False) -> None:
        p = params or SamplingParams()
        self._core.submit(req_id, model, list(prompt_ids), capture_logits=capture_logits, **p.kwargs())

    def cancel(self, req_id: int) -> None:
        self._core.cancel(req_id)

    def fileno(self) -> int:
        """An eventfd that is readable while events are pending (for loop.add_reader / select)."""
        return int(self._core.event_fd())

    def drain_events(self) -> list[EngineEvent]:
        with self._lock:
            held, self._held.events = self._held.events, []
        return held + [_event(t) for t in self._core.drain_events()]

    def wait_events(self, timeout_s: float | None = None) -> list[EngineEvent]:
        """Blocks until at least one event is pending (or the timeout passes)."""
        with self._lock:
            if self._held.events:
                held, self._held.events = self._held.events, []
                return held
        select.select([self.fileno()], [], [], timeout_s)
        return self.drain_events()

    def generate(self, model: str, prompt_ids: list[int], params: SamplingParams | None = None) -> list[int]:
        """Runs one request to completion and returns its generated ids (events of others are kept)."""
        return self._run(model, prompt_ids, params or SamplingParams(), capture_logits=False)[0]

    def debug_logits(self, model: str, prompt_ids: list[int]) -> np.ndarray:
        """Last-position logits [n_vocab] (float32) of the prompt — for parity tests."""
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        return self._run(model, prompt_ids, params, capture_logits=True)[1]

    def _run(self, model: str, prompt_ids: list[int], params: SamplingParams,
             capture_logits: bool) -> tuple[list[int], np.ndarray]:
        rid = self.new_request_id()
        self.submit(rid, model, prompt_ids, params, capture_logits)
        tokens: list[int] = []
        while True:
            others = []
            for ev in self.wait_events(1.0):
                if ev.req_id != rid:
                    others.append(ev)
                elif ev.kind == "token":
                    tokens.append(ev.token_id)
                elif ev.kind == "error":
                    raise _core.LayermuxError(ev.message)
                else:
                    with self._lock:
                        self._held.events[:0] = others
                    logits = np.asarray(self._core.take_logits(rid)) if capture_logits else np.zeros(0, np.float32)
                    return tokens, logits
            if others:
                with self._lock:
                    self._held.events[:0] = others

    # ---- introspection ----
    def ledger(self) -> dict[str, Any]:
        return dict(self._core.ledger())

    def kv_bytes_for(self, model: str, n_tokens: int) -> int:
        return int(self._core.kv_bytes_for(model, n_tokens))

    def stats(self) -> dict[str, Any]:
        return dict(self._core.stats())

    def info(self) -> dict[str, Any]:
        return dict(self._core.config())

    # ---- lifetime ----
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._core.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
