"""Helpers of the fault-injection suite (tests/test_faults.py): tiny models, worker processes,
reply-stream readers and the undisturbed reference of a request.
Owned by the tests; nothing here is mocked: workers are real `layermux worker` processes on a
real redis-server, killed with real signals.
Not thread-safe: one test drives its `Fleet` from one thread.

A worker process is `python -m worker.cli worker --config FILE` with an explicit worker_id, so
the test knows its name in Redis. It is *ready* when its own entry appears in `P:workers`
(written by the stats reporter right after the models are registered); it is *gone* when the
process has exited. Every process a test starts is registered with a `Fleet`, whose `close()`
(always in a finally block) SIGKILLs whatever is still alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import redis

from engine import Engine, EngineConfig, SamplingParams
from engine.text import IncrementalDetokenizer, Tokenizer
from producer_sdk.keys import CONSUMER_GROUP, Keys
from producer_sdk.protocol import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    StartedEvent,
    TokenEvent,
    decode_event,
)
from tools.model_factory import make_model

__all__ = [
    "TERMINAL",
    "Fleet",
    "ProducerProcs",
    "RequestSpec",
    "Tally",
    "WorkerProc",
    "make_models",
    "raw_events",
    "reference_output",
    "stream_view",
    "wait_until",
    "write_config",
]

REPO: Final = Path(__file__).resolve().parents[1]
TERMINAL: Final = (DoneEvent, ErrorEvent, CancelledEvent)
# Upper bounds for waits only: a test fails when one passes, nothing asserts on time.
READY_TIMEOUT_S: Final = 90.0
EXIT_TIMEOUT_S: Final = 60.0

# Three small models, one per architecture variant, big enough that a long completion takes
# a good fraction of a second on one core (so kills land in the middle of generations).
MODEL_SHAPES: Final[dict[str, dict[str, Any]]] = {
    "ma": {"arch": "llama", "hidden": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 2, "intermediate": 768,
           "max_position_embeddings": 1024, "seed": 11, "init_std": 0.1},
    "mb": {"arch": "qwen2", "hidden": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 1, "intermediate": 768,
           "max_position_embeddings": 1024, "seed": 12, "init_std": 0.1},
    "mc": {"arch": "llama", "hidden": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 2, "intermediate": 768,
           "tie_embeddings": True, "max_position_embeddings": 1024, "seed": 13, "init_std": 0.1},
}


def make_models(root: Path, names: Iterable[str] = MODEL_SHAPES) -> dict[str, Path]:
    return {name: make_model(root / name, **MODEL_SHAPES[name]) for name in names}


def write_config(path: Path, *, redis_url: str, prefix: str, worker_id: str, models: Mapping[str, Path],
                 **settings: Any) -> Path:
    """A worker TOML file: top-level `settings` (lease_idle_ms, drain_timeout_s, ...), one
    [[models]] table per model (max_tokens_limit raised to the context size)."""
    lines = [f"redis_url = {_toml(redis_url)}", f"key_prefix = {_toml(prefix)}", f"worker_id = {_toml(worker_id)}"]
    device = settings.pop("device", {"budget": "64MiB", "n_threads": 1})
    model_extra = settings.pop("model_extra", {})
    lines += [f"{k} = {_toml(v)}" for k, v in settings.items()]
    lines.append("[device]")
    lines += [f"{k} = {_toml(v)}" for k, v in device.items()]
    for name, model_path in models.items():
        lines += ["[[models]]", f"name = {_toml(name)}", f"path = {_toml(str(model_path))}",
                  "max_tokens_limit = 1024"]
        lines += [f"{k} = {_toml(v)}" for k, v in model_extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return orjson.dumps(str(value)).decode()  # a JSON string is a valid TOML basic string


# -- worker processes ----------------------------------------------------------------------------


class WorkerProc:
    """One `layermux worker` process; its output goes to `log_path`."""

    def __init__(self, config: Path, worker_id: str, log_path: Path, keys: Keys) -> None:
        self.config = config
        self.worker_id = worker_id
        self.log_path = log_path
        self.keys = keys
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.started_at = time.time()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def __repr__(self) -> str:
        return f"WorkerProc({self.worker_id!r}, pid={self.proc.pid}, rc={self.proc.poll()})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, client: redis.Redis, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until this process's entry is in P:workers (models loaded, registered, first stats)."""
        deadline = time.monotonic() + timeout_s
        while True:
            raw = client.hget(self.keys.workers(), self.worker_id)
            if raw is not None and float(orjson.loads(raw).get("started_at", 0)) >= self.started_at - 1.0:
                return
            if not self.alive:
                raise AssertionError(f"{self} exited before it was ready; log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self} not ready within {timeout_s} s; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash (OOM killer, power loss of the box) would."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} did not exit within {timeout_s} s; log tail:\n{self.log_tail()}") from None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@dataclass
class Fleet:
    """Every worker process of one test; `close()` SIGKILLs the ones still running."""

    root: Path
    redis_url: str
    prefix: str
    models: Mapping[str, Path]
    settings: dict[str, Any] = field(default_factory=dict)
    procs: list[WorkerProc] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def start(self, worker_id: str, **overrides: Any) -> WorkerProc:
        n = sum(p.worker_id == worker_id for p in self.procs)
        cfg = write_config(self.root / f"{worker_id}.{n}.toml", redis_url=self.redis_url, prefix=self.prefix,
                           worker_id=worker_id, models=self.models, **{**self.settings, **overrides})
        proc = WorkerProc(cfg, worker_id, self.root / f"{worker_id}.{n}.log", self.keys)
        self.procs.append(proc)
        return proc

    def live(self) -> list[WorkerProc]:
        return [p for p in self.procs if p.alive]

    def close(self) -> None:
        for p in self.procs:
            if p.alive:
                p.proc.kill()
        for p in self.procs:
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
                pass

    def logs(self) -> str:
        return "\n".join(f"--- {p} ---\n{p.log_tail()}" for p in self.procs)


# -- reading what the producer sees ---------------------------------------------------------------


def raw_events(client: redis.Redis, keys: Keys, request_id: str) -> list[Event]:
    """Every event of a reply stream as stored (no de-duplication), in stream order."""
    return [decode_event(fields[b"data"]) for _id, fields in client.xrange(keys.events(request_id))]


@dataclass
class StreamView:
    """What one request's events say, as judged by the exactly-once rules."""

    n_terminal: int = 0
    terminal: Event | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    repeated: int = 0  # token indices delivered more than once
    gaps: int = 0  # token events that start past the next expected index
    after_terminal: int = 0  # events written after the terminal event
    attempts: int = 0  # started events


def stream_view(events: Iterable[Event]) -> StreamView:
    """Judge a list of events: the SDK's events() (should be perfect) or a raw reply stream."""
    v = StreamView()
    for ev in events:
        if v.terminal is not None:
            v.after_terminal += 1
        if isinstance(ev, StartedEvent):
            v.attempts += 1
        elif isinstance(ev, TokenEvent):
            n = len(v.token_ids)
            end = ev.index + len(ev.token_ids)
            if ev.index > n:
                v.gaps += 1
            if ev.index < n:
                v.repeated += min(end, n) - ev.index
            if end > n and ev.index <= n:
                v.token_ids.extend(ev.token_ids[n - ev.index:])
                v.text += ev.text if ev.index == n else ""
        elif isinstance(ev, TERMINAL):
            v.n_terminal += 1
            if v.terminal is None:
                v.terminal = ev
    return v


# -- the undisturbed reference ----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    ignore_eos: bool

    def submit_kwargs(self) -> dict[str, Any]:
        return {"prompt_ids": list(self.prompt_ids), "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "ignore_eos": self.ignore_eos,
                "request_id": self.request_id}


def reference_output(models: Mapping[str, Path], specs: Iterable[RequestSpec]) -> dict[str, tuple[list[int], str]]:
    """request_id -> (token_ids, text) of each request run alone by the engine (no worker, no Redis)."""
    out: dict[str, tuple[list[int], str]] = {}
    specs = list(specs)
    eng = Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2))
    try:
        tokenizers = {}
        for name in sorted({s.model for s in specs}):
            eng.load_model(name, models[name])
            tokenizers[name] = Tokenizer.from_model_dir(models[name])
        for s in specs:
            ids = eng.generate(s.model, list(s.prompt_ids), SamplingParams(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, max_tokens=s.max_tokens,
                ignore_eos=s.ignore_eos))
            detok = IncrementalDetokenizer(tokenizers[s.model], list(s.prompt_ids))
            text = "".join(detok.push(t) for t in ids) + detok.flush()
            out[s.request_id] = (ids, text)
    finally:
        eng.close()
    return out


# -- misc -----------------------------------------------------------------------------------------------


def wait_until(check: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval_s)


def pending_count(client: redis.Redis, keys: Keys, model: str) -> int:
    info = client.xpending(keys.req(model), CONSUMER_GROUP)
    return int(info["pending"])


@dataclass
class Tally:
    """The figures a fault test prints (pytest -s shows them)."""

    name: str
    figures: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.figures[key] = self.figures.get(key, 0) + n

    def __getitem__(self, key: str) -> int:
        return self.figures.get(key, 0)

    def report(self) -> str:
        line = f"[faults] {self.name}: " + ", ".join(f"{k}={v}" for k, v in self.figures.items())
        print(line, flush=True)
        return line


# -- a producer process ---------------------------------------------------------------------------------


def produce_main(argv: list[str]) -> int:
    """`python faultlib.py produce URL PREFIX SPECS_JSON REPORT_JSON`: submit every request of the
    specs file, then read each one's events and result through the SDK; write what was seen."""
    from producer_sdk import Producer

    url, prefix, specs_path, report_path = argv
    specs = [RequestSpec(**{**d, "prompt_ids": tuple(d["prompt_ids"])})
             for d in orjson.loads(Path(specs_path).read_bytes())]
    report: dict[str, Any] = {}
    with Producer(url, prefix=prefix) as producer:
        handles = [producer.submit(s.model, **s.submit_kwargs()) for s in specs]
        for s, handle in zip(specs, handles):
            events = list(handle.events())
            view = stream_view(events)
            try:
                result = handle.result(timeout=0)
                outcome: Any = {"token_ids": result.token_ids, "text": result.text}
            except Exception as e:  # noqa: BLE001 - reported, judged by the test
                outcome = {"error": repr(e)}
            report[s.request_id] = {"n_terminal": view.n_terminal, "repeated": view.repeated, "gaps": view.gaps,
                                    "token_ids": view.token_ids, "text": view.text, "result": outcome,
                                    "duplicate_submit": handle.duplicate}
    Path(report_path).write_bytes(orjson.dumps(report))
    return 0


class ProducerProcs:
    """Producer processes (`python faultlib.py produce|offer ...`), one per batch of JSON-able items;
    `reports()` waits for all of them and merges what they saw. `kill()` (in a finally block) stops
    the ones still running."""

    def __init__(self, mode: str, redis_url: str, prefix: str, batches: list[list[Any]], workdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.report_paths: list[Path] = []
        for i, batch in enumerate(batches):
            batch_path, report_path = workdir / f"{mode}-batch{i}.json", workdir / f"{mode}-report{i}.json"
            batch_path.write_bytes(orjson.dumps(batch))
            self.report_paths.append(report_path)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__)), mode, redis_url, prefix, str(batch_path), str(report_path)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

    def reports(self, timeout_s: float) -> dict[str, Any]:
        """Each process must exit 0 (its output is the failure message); their reports merged."""
        for p in self.procs:
            out, _ = p.communicate(timeout=timeout_s)
            assert p.returncode == 0, out.decode(errors="replace")
        seen: dict[str, Any] = {}
        for r in self.report_paths:
            seen.update(orjson.loads(r.read_bytes()))
        return seen

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def offer_main(argv: list[str]) -> int:
    """`python faultlib.py offer URL PREFIX OFFERS_JSON REPORT_JSON`: submit every offer as fast as
    possible, without retrying a refusal, then read each accepted request's events to the end.
    An offer is {request_id, model, prompt_ids, max_tokens}. The report maps each request id to
    {"refused": code, details} (the typed SDK error) or {"terminal": kind, "code", "n_terminal",
    "completion_tokens"}; any other exception escapes and fails the process."""
    from producer_sdk import LayermuxClientError, Producer

    url, prefix, offers_path, report_path = argv
    offers = orjson.loads(Path(offers_path).read_bytes())
    report: dict[str, Any] = {}
    accepted = []
    with Producer(url, prefix=prefix) as producer:
        for o in offers:
            try:
                handle = producer.submit(o["model"], prompt_ids=o["prompt_ids"], max_tokens=o["max_tokens"],
                                         request_id=o["request_id"], ignore_eos=True, seed=1)
            except LayermuxClientError as e:
                report[o["request_id"]] = {"refused": e.code, "details": e.details, "type": type(e).__name__}
                continue
            accepted.append(handle)
        for handle in accepted:
            events = list(handle.events())
            terminals = [e for e in events if isinstance(e, TERMINAL)]
            last = terminals[-1] if terminals else None
            report[handle.request_id] = {
                "terminal": type(last).__name__ if last else None,
                "code": getattr(last, "code", None), "n_terminal": len(terminals),
                "completion_tokens": sum(len(e.token_ids) for e in events if isinstance(e, TokenEvent)),
            }
    Path(report_path).write_bytes(orjson.dumps(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "produce":
        sys.exit(produce_main(sys.argv[2:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "offer":
        sys.exit(offer_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} produce|offer URL PREFIX SPECS_JSON REPORT_JSON")
