"""Owns: the worker's Engine — loading models off the event loop, tokenizing requests, submitting
them, and turning the engine's token events into text (incremental detokenizer, stop strings)
delivered to each request's sink. Also the capacity signal the consumers wait on.
Changed by: the worker; the engine's facade (engine/core.py, typed by engine/_core.pyi) is the contract.
Thread-safety: event-loop only. Blocking engine calls (load_model, tokenizing) go through
asyncio.to_thread; engine events wake the loop through eng.fileno() (loop.add_reader), never a poll.

A request in the engine is a `Run`. Its text is streamed with a hold-back when it has stop
strings: the last len(longest stop) - 1 characters, and the last token id, are only published
once they are known not to begin a stop string (without stop strings, only a last id whose
bytes the detokenizer still holds waits). When a stop string appears, the engine request
is cancelled, the text is cut before the stop string, and the request finishes with
finish_reason "stop_string" (token_ids keep the token that completed it, as vLLM does). The
token events of a request therefore always concatenate to exactly its final text and ids.

Codes. The engine ends a request with a typed FinishReason or ErrorCode; `ENGINE_ERROR_CODES`
below is the one table from engine codes to the wire protocol's (producer_sdk/protocol.py), so a
request whose KV can never fit reaches its producer as `kv_exceeds_budget` (RejectedError).

Resume (a request taken over from a worker that died): sampling is deterministic per (seed,
token index), so the run regenerates the same tokens and publishes only those at index >=
`resume_index`, and only the text after the first `resume_chars` characters.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from engine import (
    Engine,
    EngineConfig,
    EngineEvent,
    ErrorCode,
    EventKind,
    Eviction,
    FinishReason,
    LedgerSnapshot,
    MatmulPrecision,
    ModelFootprint,
    ModelInfo,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
)
from producer_sdk.protocol import ChatMessage, RequestMessage, SamplingParamsModel
from producer_sdk.protocol import ErrorCode as WireCode

from . import admission
from .admission import Denial, DeviceView, ModelLoad
from .settings import ModelSettings, Settings

__all__ = ["ENGINE_ERROR_CODES", "CapacitySignal", "EngineDriver", "InvalidPrompt", "Outcome", "Run", "RunSink",
           "footprint_json", "ledger_json"]

log = logging.getLogger("layermux.worker.engine")

# Prompts longer than this (characters) are tokenized on a thread instead of on the loop.
_TOKENIZE_INLINE_CHARS: Final = 2048

CancelReason = Literal["cancelled", "deadline", "stop_string", "abandon", "failed"]

# The engine's error codes as the protocol's: the one place they are translated.
ENGINE_ERROR_CODES: Final[Mapping[ErrorCode, WireCode]] = {
    ErrorCode.kv_exceeds_budget: WireCode.KV_EXCEEDS_BUDGET,  # can never fit this device: a denial, not a failure
    ErrorCode.model_unloaded: WireCode.WORKER_FAILURE,
    ErrorCode.engine_failure: WireCode.WORKER_FAILURE,
    ErrorCode.shutdown: WireCode.WORKER_FAILURE,
}


class InvalidPrompt(ValueError):
    """The request's prompt cannot be turned into tokens for this model (code invalid_request)."""


class CapacitySignal:
    """Broadcast "capacity may have changed" (a request finished, a model loaded).

    Take `waiter()` *before* checking the condition, then await it: a notify in between is not lost.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass(slots=True)
class Outcome:
    """How a run ended; exactly one of these reaches its sink (unless the run is abandoned)."""

    kind: Literal["done", "error", "cancelled"]
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str = ""  # done: stop | length | stop_string
    code: str = ""  # error: a protocol error code
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)


class RunSink(Protocol):
    """Where a run's output goes: a reply stream (stream path) or an arq job result."""

    def on_tokens(self, run: Run, index: int, token_ids: list[int], text: str) -> None: ...

    def on_finish(self, run: Run, outcome: Outcome) -> None: ...

    def on_abandon(self, run: Run) -> None: ...


@dataclass(eq=False, slots=True)
class Run:
    request_id: str
    eng_id: int
    model: str
    prompt_ids: list[int]
    params: SamplingParamsModel
    sink: RunSink
    submitted_at: float  # unix seconds, from the request
    deadline_at: float | None
    started_at: float  # unix seconds when submitted to the engine
    detok: Any
    stop: tuple[str, ...]
    hold_chars: int  # text held back while it may still begin a stop string
    ids_sent: int  # token ids handed to the sink so far (starts at resume_index)
    text_sent: int  # characters handed to the sink so far (starts at resume_chars)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    first_token_at: float | None = None
    last_piece_empty: bool = False  # the detokenizer holds the last token's bytes back (or it has no text)
    cancel_reason: CancelReason | None = None
    finished: bool = False  # the sink has its outcome (or abandon); engine events are now ignored
    timer: asyncio.TimerHandle | None = None
    context: dict[str, Any] = field(default_factory=dict)  # the sink's own bookkeeping


EngineFactory = Callable[[Settings], Engine]


def engine_config(settings: Settings) -> EngineConfig:
    d = settings.device
    return EngineConfig(
        budget_bytes=int(d.budget), cap_fraction=d.cap_fraction, n_threads=d.n_threads,
        prefetch_depth=d.prefetch_depth, eviction=Eviction.__members__[d.eviction],
        kv_block_tokens=d.kv_block_tokens, max_batch_tokens=d.max_batch_tokens,
        matmul_precision=MatmulPrecision.__members__[d.matmul_precision], device_kind=d.kind, device_index=d.index,
        link_gbps=d.link_gbps or 0.0, kv_dtype=d.kv_dtype, max_turn_steps=d.max_turn_steps,
        max_wait_ms=d.max_wait_ms, first_token_ms=d.first_token_ms)


def _default_engine_factory(settings: Settings) -> Engine:
    return Engine(engine_config(settings))


def footprint_json(f: ModelFootprint) -> dict[str, Any]:
    """A model's footprint as the status document shows it (what each residency choice costs)."""
    return {"n_layer": f.n_layer, "weights": f.weights, "matrix_format": f.matrix_format,
            "head_bytes": f.head_bytes, "layer_bytes": f.layer_bytes, "workspace_bytes": f.workspace_bytes,
            "resident_bytes": f.device_bytes(f.n_layer), "kv_bytes_per_token": f.kv_bytes_per_token,
            "kv_block_bytes": f.kv_block_bytes, "kv_block_tokens": f.kv_block_tokens}


def ledger_json(snap: LedgerSnapshot) -> dict[str, Any]:
    """The ledger as the status document and the metrics read it (JSON-ready)."""
    return {
        "budget_bytes": snap.budget_bytes, "cap_bytes": snap.cap_bytes, "used_bytes": snap.used_bytes,
        "headroom_bytes": snap.headroom_bytes, "peak_bytes": snap.peak_bytes, "n_denied": snap.n_denied,
        "kv_capacity_bytes": snap.kv_capacity_bytes,
        "models": {name: {"weights_bytes": o.weights_bytes, "kv_bytes": o.kv_bytes,
                          "workspace_bytes": o.workspace_bytes, "kv_capacity_blocks": o.kv_capacity_blocks,
                          "kv_capacity_tokens": o.kv_capacity_tokens}
                   for name, o in snap.models.items()},
    }


def _default_tokenizer_factory(path: str) -> Any:
    from engine.text import Tokenizer

    return Tokenizer.from_model_dir(path)


def _default_detokenizer_factory(tokenizer: Any, prompt_ids: list[int]) -> Any:
    from engine.text import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, prompt_ids)


class EngineDriver:
    """Owns the Engine and every Run in it. Create, `await start()`, use, `await close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: EngineFactory = _default_engine_factory,
        tokenizer_factory: Callable[[str], Any] = _default_tokenizer_factory,
        detokenizer_factory: Callable[[Any, list[int]], Any] = _default_detokenizer_factory,
        on_tokens_generated: Callable[[str, int], None] | None = None,
        on_finished: Callable[[str, Outcome], None] | None = None,
        load_progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.capacity = CapacitySignal()
        self.eng: Engine | None = None
        self.info: dict[str, ModelInfo] = {}  # model -> as loaded
        self.tokenizers: dict[str, Any] = {}
        self._engine_factory = engine_factory
        self._tokenizer_factory = tokenizer_factory
        self._detokenizer_factory = detokenizer_factory
        self._on_tokens_generated = on_tokens_generated
        self._on_finished = on_finished  # (model, outcome) of every run that finishes, for metrics
        self._load_progress = load_progress  # (model, layers done, layers) while a model loads (load thread)
        self._runs: dict[int, Run] = {}  # eng_id -> run (until the engine's final event)
        self._by_request: dict[str, Run] = {}  # request_id -> run (same lifetime)
        self._n_running: dict[str, int] = {m.name: 0 for m in settings.models}
        self._ids = itertools.count(1)
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the engine and load every configured model (each load on a thread)."""
        self._loop = asyncio.get_running_loop()
        self.eng = eng = await asyncio.to_thread(self._engine_factory, self.settings)
        try:
            plan = await asyncio.to_thread(self._plan_residency, eng)
            for m in self.settings.models:
                await self.load(m, placement=plan.get(m.name))
            self._fd = eng.fileno()
            self._loop.add_reader(self._fd, self._on_readable)
        except BaseException:
            await self.close()
            raise

    def _plan_residency(self, eng: Engine) -> dict[str, tuple[ResidencyMode, int]]:
        """Placements when every model is `residency = "auto"` and there are several: one engine call
        plans them all (engine/src/footprint.h), so that a model loaded early cannot take the room a
        later one needs. {} (each load decides alone) otherwise, or when even the minimums do not fit
        (the load that fails then says so with its numbers)."""
        models = self.settings.models
        if len(models) < 2 or any(m.residency != "auto" for m in models):
            return {}
        plan = eng.plan_residency([(m.name, m.path, m.weights) for m in models])
        if plan is None:
            log.warning("residency plan: the models' minimums (head + 2 slots + workspace each) and the room kept "
                        "for KV do not fit the cap of %d bytes; loading one by one", eng.ledger().cap_bytes)
            return {}
        for p in plan:
            log.info("residency plan: %s %s (%s layer slots, %d bytes with its workspace)", p.name, p.residency.name,
                     p.n_slots or "all", p.device_bytes)
        return {p.name: (p.residency, p.n_slots) for p in plan}

    async def load(self, m: ModelSettings, placement: tuple[ResidencyMode, int] | None = None) -> ModelInfo:
        """Load one model: as a residency plan placed it (residency, stream slots), else as its
        settings say."""
        eng = self._engine()
        t0 = time.monotonic()
        residency, stream_slots = placement if placement is not None else (ResidencyMode.__members__[m.residency], 0)
        options = ModelLoadOptions(residency=residency, sched_weight=m.sched_weight, max_running=m.max_running,
                                   stream_slots=stream_slots)
        progress = None if self._load_progress is None else functools.partial(self._load_progress, m.name)
        info = await asyncio.to_thread(eng.load_model, m.name, m.path, m.weights, options, progress=progress)
        self.tokenizers[m.name] = await asyncio.to_thread(self._tokenizer_factory, m.path)
        self.info[m.name] = info
        self._n_running.setdefault(m.name, 0)
        log.info("model %s loaded from %s in %.1f s: n_ctx %d, weights %s (held as %s), %s", m.name, m.path,
                 time.monotonic() - t0, info.n_ctx, info.weights, info.matrix_format,
                 "resident" if info.resident else f"streamed through {info.n_slots} layer slots")
        self.capacity.notify()
        return info

    def _engine(self) -> Engine:
        assert self.eng is not None, "the driver is not started"
        return self.eng

    async def close(self) -> None:
        """Stop event delivery and close the engine. Runs still in it are dropped without a terminal."""
        if self._closed:
            return
        self._closed = True
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        for run in list(self._runs.values()):
            self._abandon(run)
        if self.eng is not None:
            await asyncio.to_thread(self.eng.close)

    # -- numbers the consumers and the stats reporter read -------------------------------------------

    def running_count(self, model: str | None = None) -> int:
        if model is None:
            return sum(self._n_running.values())
        return self._n_running.get(model, 0)

    def runs(self, model: str | None = None) -> list[Run]:
        return [r for r in self._by_request.values() if model is None or r.model == model]

    def run_for(self, request_id: str) -> Run | None:
        return self._by_request.get(request_id)

    def ledger(self) -> dict[str, Any]:
        """The ledger now, JSON-ready (the status document's shape; see ledger_json), and the device it
        books ("cpu", or a GPU's name, driver, heap and transfer queue: Engine.device_summary)."""
        eng = self._engine()
        return {**ledger_json(eng.ledger()), "device": eng.device_summary()}

    def kv_bytes_for(self, model: str, n_tokens: int) -> int:
        return self._engine().kv_bytes_for(model, n_tokens)

    def min_reservation_bytes(self, model: str) -> int:
        n = admission.min_reservation_tokens(self.settings.device.kv_block_tokens)
        return self.kv_bytes_for(model, min(n, self.info[model].n_ctx))

    def device_view(self, waiting: Mapping[str, int] | None = None) -> DeviceView:
        """The read gate's inputs, from the ledger now and the last known Redis backlog."""
        ledger = self._engine().ledger()
        loads = {}
        for m in self.settings.models:
            if m.name not in self.info:
                continue
            booked = ledger.models.get(m.name)
            loads[m.name] = ModelLoad(
                running=self.running_count(m.name), max_running=m.max_running,
                kv_bytes=booked.kv_bytes if booked is not None else 0,
                min_reservation_bytes=self.min_reservation_bytes(m.name), sched_weight=m.sched_weight,
                waiting=int((waiting or {}).get(m.name, 0)))
        return DeviceView(headroom_bytes=ledger.headroom_bytes, models=loads)

    # -- requests -------------------------------------------------------------------------------------

    async def tokenize(self, msg: RequestMessage) -> list[int]:
        """The request's prompt as token ids; raises InvalidPrompt naming what is wrong."""
        return await self.tokenize_parts(msg.model, msg.prompt, msg.messages, msg.prompt_ids)

    async def tokenize_parts(self, model: str, prompt: str | None, messages: list[ChatMessage] | None,
                             prompt_ids: list[int] | None) -> list[int]:
        tok = self.tokenizers[model]
        if prompt_ids is not None:
            n_vocab = self.info[model].n_vocab
            bad = next((t for t in prompt_ids if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise InvalidPrompt(f"prompt_ids: token id {bad} is outside the vocabulary [0, {n_vocab})")
            ids = list(prompt_ids)
        elif prompt is not None:
            ids = await self._call(len(prompt), tok.encode, prompt, add_special_tokens=True)
        elif messages is not None:
            chat = [{"role": m.role, "content": m.content} for m in messages]
            size = sum(len(m.content) for m in messages)
            try:
                text = await self._call(size, tok.apply_chat_template, chat, add_generation_prompt=True)
            except (ValueError, TypeError, LookupError, RuntimeError) as e:
                raise InvalidPrompt(f"messages: the model's chat template refused them: {e}") from e
            ids = await self._call(len(text), tok.encode, text, add_special_tokens=False)
        else:  # RequestMessage guarantees one of the three
            raise InvalidPrompt("expected one of prompt, messages, prompt_ids")
        if not ids:
            raise InvalidPrompt("the prompt is empty after tokenization")
        return [int(t) for t in ids]

    @staticmethod
    async def _call(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if size > _TOKENIZE_INLINE_CHARS:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def check(self, model: str, prompt_tokens: int, max_tokens: int) -> Denial | None:
        """The request check of admission.py with this device's numbers."""
        n_ctx = self.info[model].n_ctx
        limit = self.settings.model(model).max_tokens_limit
        need = admission.kv_tokens_needed(prompt_tokens, max_tokens, n_ctx)
        if prompt_tokens + max_tokens <= n_ctx and max_tokens <= limit:
            needed_kv = self.kv_bytes_for(model, prompt_tokens + max_tokens)
        else:
            needed_kv = self.kv_bytes_for(model, need)  # denied before the KV check anyway
        ledger = self._engine().ledger()
        return admission.check_request(
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=n_ctx, max_tokens_limit=limit,
            needed_kv_bytes=needed_kv, cap_bytes=ledger.cap_bytes, kv_capacity_bytes=ledger.kv_capacity_bytes)

    def begin(
        self,
        request_id: str,
        model: str,
        prompt_ids: list[int],
        params: SamplingParamsModel,
        sink: RunSink,
        *,
        submitted_at: float,
        deadline_at: float | None = None,
        resume_index: int = 0,
        resume_chars: int = 0,
    ) -> Run:
        """Submit to the engine. Raises engine.errors.InvalidRequestError (names the field) or
        ValueError when a request with this id already runs here."""
        assert not self._closed
        if request_id in self._by_request:
            raise ValueError(f"request {request_id!r} is already running in this worker")
        eng_id = next(self._ids)
        tok = self.tokenizers[model]
        stop = tuple(params.stop)
        sp = SamplingParams(
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, seed=params.seed, max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos)
        self._engine().submit(eng_id, model, prompt_ids, sp)
        run = Run(
            request_id=request_id, eng_id=eng_id, model=model, prompt_ids=prompt_ids, params=params, sink=sink,
            submitted_at=submitted_at, deadline_at=deadline_at, started_at=time.time(),
            detok=self._detokenizer_factory(tok, prompt_ids), stop=stop,
            hold_chars=max((len(s) for s in stop), default=1) - 1, ids_sent=resume_index, text_sent=resume_chars)
        self._runs[eng_id] = run
        self._by_request[request_id] = run
        self._n_running[model] = self._n_running.get(model, 0) + 1
        if deadline_at is not None:
            assert self._loop is not None
            delay = max(0.0, deadline_at - time.time())
            run.timer = self._loop.call_later(delay, self.cancel, request_id, "deadline")
        return run

    def cancel(self, request_id: str, reason: CancelReason = "cancelled") -> bool:
        """Ask the engine to stop a run; its outcome follows when the engine confirms. False if unknown."""
        run = self._by_request.get(request_id)
        if run is None or run.finished:
            return False
        if run.cancel_reason is None:
            run.cancel_reason = reason
        self._engine().cancel(run.eng_id)
        return True

    def abandon(self, request_id: str) -> None:
        """Stop a run without a terminal event (drain timeout, lease lost): its entry stays pending."""
        run = self._by_request.get(request_id)
        if run is not None:
            self._abandon(run)

    def abandon_all(self) -> None:
        for run in list(self._by_request.values()):
            self._abandon(run)

    def _abandon(self, run: Run) -> None:
        if not run.finished:
            run.cancel_reason = "abandon"
            run.finished = True
            if self.eng is not None and not self._closed:
                self.eng.cancel(run.eng_id)
            self._safe(run.sink.on_abandon, run)
        self._retire(run)

    # -- engine events ----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Handle what the engine queued (one engine step's tokens, often several steps' when the loop
        is busy). Each token is detokenized and checked for stop strings as it comes; a run's new
        ids and text go to its sink once per batch (after the batch, or just before the run's
        terminal event), so a busy loop hands the publisher fewer, larger pieces.

        Dispatch reads `token_id`, not `kind`: a terminal event's token is -1 (engine.h EngineEvent),
        and reading the kind makes a new enum object per event (about half the cost of a token)."""
        runs = self._runs
        touched: dict[int, Run] = {}  # eng_id -> run with tokens not yet handed to its sink
        counts: dict[str, int] = {}  # model -> tokens generated in this batch
        for ev in self._engine().drain_events():
            eng_id = ev.req_id
            run = runs.get(eng_id)
            if run is None:
                continue
            token_id = ev.token_id
            try:
                if token_id >= 0:
                    if run.finished:
                        continue  # tokens the engine produced before it saw our cancel
                    counts[run.model] = counts.get(run.model, 0) + 1
                    if self._on_token(run, token_id):
                        touched[eng_id] = run
                    continue
                if touched.pop(eng_id, None) is not None and not run.finished:
                    self._flush(run, final=False)  # this batch's tokens before the terminal event
                if ev.kind == EventKind.done:
                    self._on_done(run, ev)
                else:
                    self._on_engine_error(run, ev)
            except Exception:  # a bug in one request's handling must not stop the others' events
                log.exception("request %s: failed handling engine event %r", run.request_id, ev)
                touched.pop(eng_id, None)
                if not run.finished:
                    self._finish(run, self._outcome(run, "error", code="worker_failure",
                                                    message="the worker failed handling this request"))
                if token_id < 0:
                    self._retire(run)
        for run in touched.values():
            if not run.finished:
                try:
                    self._flush(run, final=False)
                except Exception:
                    log.exception("request %s: failed handing tokens to its sink", run.request_id)
                    self._finish(run, self._outcome(run, "error", code="worker_failure",
                                                    message="the worker failed handling this request"))
        if counts and self._on_tokens_generated is not None:
            for model, n in counts.items():
                self._on_tokens_generated(model, n)

    def _on_token(self, run: Run, token_id: int) -> bool:
        """Record one token of a live run. True: its sink has new tokens to get (`_flush`);
        False: a stop string ended the run (flushed and finished here)."""
        if run.first_token_at is None:
            run.first_token_at = time.time()
        run.token_ids.append(token_id)
        piece = run.detok.push(token_id)
        if not piece:
            run.last_piece_empty = True
            return True
        run.last_piece_empty = False
        if not run.stop:
            run.text += piece
            return True
        prev_len = len(run.text)
        run.text += piece
        hit = _find_stop(run.text, run.stop, max(0, prev_len - run.hold_chars))
        if hit is None:
            return True
        run.text = run.text[:hit]
        run.cancel_reason = "stop_string"
        self._engine().cancel(run.eng_id)
        self._flush(run, final=True)
        self._finish(run, self._outcome(run, "done", finish_reason="stop_string"))
        return False

    def _on_done(self, run: Run, ev: EngineEvent) -> None:
        if not run.finished:
            reason = ev.finish_reason.name
            timing = {"prefill_ms": ev.prefill_ms, "decode_ms": ev.decode_ms}
            if ev.finish_reason == FinishReason.cancelled and run.cancel_reason == "deadline":
                self._finish(run, self._outcome(
                    run, "error", code="deadline_exceeded",
                    message="the request's deadline passed while it was running",
                    details={"deadline_at": run.deadline_at, "completion_tokens": len(run.token_ids)},
                    timing=timing))
            elif ev.finish_reason == FinishReason.cancelled:
                self._finish(run, self._outcome(run, "cancelled", timing=timing))
            else:
                # Bytes the detokenizer held back for a character that never completed.
                prev_len = len(run.text)
                run.text += run.detok.flush()
                hit = _find_stop(run.text, run.stop, max(0, prev_len - run.hold_chars)) if run.stop else None
                if hit is not None:
                    run.text, reason = run.text[:hit], "stop_string"
                self._flush(run, final=True)
                self._finish(run, self._outcome(run, "done", finish_reason=reason, timing=timing))
        self._retire(run)

    def _on_engine_error(self, run: Run, ev: EngineEvent) -> None:
        if not run.finished:
            code = ENGINE_ERROR_CODES.get(ev.error_code, WireCode.WORKER_FAILURE)
            if code == WireCode.WORKER_FAILURE:
                log.error("request %s: engine error %s: %s", run.request_id, ev.error_code.name, ev.message)
            details: dict[str, Any] = {"engine_code": ev.error_code.name}
            if ev.error_code == ErrorCode.kv_exceeds_budget:
                details["needed_tokens"] = len(run.prompt_ids) + run.params.max_tokens
                details["available_bytes"] = self._engine().ledger().kv_capacity_bytes
            self._finish(run, self._outcome(run, "error", code=code.value, message=ev.message, details=details))
        self._retire(run)

    def _flush(self, run: Run, *, final: bool) -> None:
        """Hand the sink the ids and text now known final (all of them when `final`)."""
        # The last id waits while its text may still change (stop-string hold-back, or bytes the
        # detokenizer holds for an unfinished character), so that the final text always has an
        # id to travel with: a token event carries at least one id.
        if final:
            n_ids, n_chars = len(run.token_ids), len(run.text)
        elif run.stop:
            n_ids, n_chars = len(run.token_ids) - 1, len(run.text) - run.hold_chars
        else:
            n_ids, n_chars = len(run.token_ids) - (1 if run.last_piece_empty else 0), len(run.text)
        if n_ids <= run.ids_sent:
            return  # text waits for its next token (a token event carries at least one id)
        ids = run.token_ids[run.ids_sent:n_ids]
        text = run.text[run.text_sent:n_chars] if n_chars > run.text_sent else ""
        index = run.ids_sent
        run.ids_sent = n_ids
        run.text_sent = max(run.text_sent, n_chars)
        run.sink.on_tokens(run, index, ids, text)

    def _outcome(self, run: Run, kind: Literal["done", "error", "cancelled"], *, finish_reason: str = "",
                 code: str = "", message: str = "", details: dict[str, Any] | None = None,
                 timing: dict[str, float] | None = None) -> Outcome:
        now = time.time()
        if timing is None:
            first = run.first_token_at
            timing = {"prefill_ms": ((first or now) - run.started_at) * 1000.0,
                      "decode_ms": (now - first) * 1000.0 if first is not None else 0.0}
        usage = {
            "prompt_tokens": len(run.prompt_ids), "completion_tokens": len(run.token_ids),
            "queue_ms": max(0.0, (run.started_at - run.submitted_at) * 1000.0),
            "prefill_ms": max(0.0, timing["prefill_ms"]), "decode_ms": max(0.0, timing["decode_ms"]),
            "total_ms": max(0.0, (now - run.submitted_at) * 1000.0),
        }
        return Outcome(kind=kind, token_ids=list(run.token_ids), text=run.text, prompt_tokens=len(run.prompt_ids),
                       finish_reason=finish_reason, code=code, message=message, details=details or {}, usage=usage)

    def _finish(self, run: Run, outcome: Outcome) -> None:
        run.finished = True
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        self._safe(run.sink.on_finish, run, outcome)
        if self._on_finished is not None:
            self._safe(self._on_finished, run.model, outcome)

    def _retire(self, run: Run) -> None:
        """The engine is done with the run (or we stopped listening): forget it, free its slot."""
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        if self._runs.pop(run.eng_id, None) is not None:
            self._by_request.pop(run.request_id, None)
            self._n_running[run.model] -= 1
            self.capacity.notify()

    @staticmethod
    def _safe(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("sink callback %s failed", getattr(fn, "__qualname__", fn))


def _find_stop(text: str, stops: Iterable[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:] (absolute), or None."""
    best: int | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best
