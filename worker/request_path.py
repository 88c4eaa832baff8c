"""Owns: the one path a request takes into the engine, whatever brought it. The stream consumer
(consumer.py), the arq `generate` job (arq_app.py) and `layermux generate` (cli.py) are sinks over it.
Changed by: the worker; the request's shape is producer_sdk/protocol.py's RequestMessage.
Thread-safety: event-loop only (the driver's thread).

    validate(fields)            -> RequestMessage | Denial   the wire protocol's checks (the stream
                                                             path decodes instead: the same model)
    await prepare(driver, msg)  -> Prepared | Denial         model served here, prompt -> token ids
                                                             (chat template), admission's request check
    start(driver, prepared, sink, ...) -> Run | Denial       engine submission; the sink gets the run's
                                                             text and ids (stop strings held back) and
                                                             exactly one outcome (engine_driver.py)
    await complete(driver, prepared, on_tokens) -> Outcome | Denial
                                                             start + wait for the outcome, for callers
                                                             that want the whole completion

A Denial is a normal result (admission.py's value: a protocol error code, a message, numbers), so
every caller reports the same code for the same request: the stream path as an error event, the
arq job as a typed error at `job_result`, the CLI as one line and exit 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from producer_sdk.errors import ProtocolError
from producer_sdk.protocol import RequestMessage, validate_request

from .admission import Denial
from .engine_driver import EngineDriver, InvalidPrompt, Outcome, Run, RunSink

__all__ = ["CompletionSink", "Prepared", "complete", "prepare", "start", "validate"]

# (run, index of the first id, ids, text) as a RunSink's on_tokens receives them.
TokensCallback = Callable[[Run, int, list[int], str], None]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request that passed every check this worker can make before the engine: run it with `start`."""

    msg: RequestMessage
    prompt_ids: list[int]


def validate(fields: Mapping[str, Any]) -> RequestMessage | Denial:
    """A request object (as `build_request` or an arq job gives it) checked by the wire protocol."""
    try:
        return validate_request(fields)
    except ProtocolError as e:
        return Denial(e.code, e.message)


async def prepare(driver: EngineDriver, msg: RequestMessage) -> Prepared | Denial:
    """Tokenize the request's prompt (messages through the model's chat template) and make
    admission's request check (context window, max_tokens limit, KV the device can ever give)."""
    if msg.model not in driver.info:
        return Denial("unknown_model", f"this worker does not serve model {msg.model!r}")
    try:
        prompt_ids = await driver.tokenize(msg)
    except InvalidPrompt as e:
        return Denial("invalid_request", str(e))
    denial = driver.check(msg.model, len(prompt_ids), msg.params.max_tokens)
    return denial if denial is not None else Prepared(msg, prompt_ids)


def start(driver: EngineDriver, prepared: Prepared, sink: RunSink, *, resume_index: int = 0,
          resume_chars: int = 0) -> Run | Denial:
    """Submit to the engine; `sink` (an engine_driver.RunSink) gets the run's tokens and its outcome.
    A Denial when the engine refuses the parameters or the request id already runs here."""
    msg = prepared.msg
    try:
        return driver.begin(msg.request_id, msg.model, prepared.prompt_ids, msg.params, sink,
                            submitted_at=msg.submitted_at, deadline_at=msg.deadline_at,
                            resume_index=resume_index, resume_chars=resume_chars)
    except ValueError as e:  # engine.errors.InvalidRequestError is a ValueError
        return Denial("invalid_request", str(e))


class CompletionSink:
    """RunSink whose outcome resolves a future; tokens go to an optional callback as they come."""

    def __init__(self, on_tokens: TokensCallback | None = None) -> None:
        self.future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._on_tokens = on_tokens

    def on_tokens(self, run: Run, index: int, token_ids: list[int], text: str) -> None:
        if self._on_tokens is not None:
            self._on_tokens(run, index, token_ids, text)

    def on_finish(self, run: Run, outcome: Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def on_abandon(self, run: Run) -> None:
        if not self.future.done():
            self.future.set_result(Outcome(
                kind="error", token_ids=list(run.token_ids), text=run.text, prompt_tokens=len(run.prompt_ids),
                code="worker_failure", message="the worker stopped before the request finished"))


async def complete(driver: EngineDriver, prepared: Prepared,
                   on_tokens: TokensCallback | None = None) -> Outcome | Denial:
    """Run a prepared request to its outcome. Cancelling the caller stops the run in the engine."""
    sink = CompletionSink(on_tokens)
    run = start(driver, prepared, sink)
    if isinstance(run, Denial):
        return run
    try:
        return await sink.future
    except asyncio.CancelledError:
        driver.abandon(run.request_id)  # e.g. arq cancelled the job (abort, timeout, shutdown), or Ctrl-C
        raise
