"""Owns: the consumer side of a reply stream: resume position, exactly-once token delivery, Result.
Changed by: SDK maintainers; the rules follow docs/protocol.md ("Exactly-once view").
Thread-safety: a ReplyCursor is mutable and belongs to one handle; not for concurrent use.

The cursor remembers two things: the id of the last stream entry consumed (XREAD resumes
after it, so after a reconnect nothing is skipped or read twice) and the index of the next
token expected. A worker that takes over a crashed worker's request regenerates the same
tokens; the cursor drops any token event lying entirely before the next expected index, so
the caller sees each token index exactly once. A token event that starts before the next
expected index and ends after it (a run resumed from a reply stream that lost its last events
in a Redis failover, after this reader had read them) is cut to its new tokens, when it starts
where an earlier event of this reader started, or where a replayed event that started there ended
(the text delivered since then is known: the same tokens give the same text). Anything
else out of order (a gap, another partial overlap, another request's event) is a protocol
violation and raises ProtocolError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    DeadlineExceededError,
    LayermuxClientError,
    ProtocolError,
    RejectedError,
    RequestCancelledError,
    UnknownModelError,
    WorkerFailureError,
)
from .protocol import (
    CancelledEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    TerminalEvent,
    TokenEvent,
    Usage,
    decode_event,
)

__all__ = ["ReplyCursor", "Result", "error_for_code", "error_for_terminal", "result_from_terminal"]


@dataclass(frozen=True, slots=True)
class Result:
    """A finished completion."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage


_ERROR_CLASSES: dict[str, type[LayermuxClientError]] = {
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    ErrorCode.WORKER_FAILURE: WorkerFailureError,
    ErrorCode.DEAD_LETTER: WorkerFailureError,
    ErrorCode.UNKNOWN_MODEL: UnknownModelError,
}


def error_for_terminal(event: ErrorEvent | CancelledEvent) -> LayermuxClientError:
    """The exception a caller gets for an `error` or `cancelled` terminal event."""
    if isinstance(event, CancelledEvent):
        return RequestCancelledError(
            "cancelled",
            f"request {event.request_id} was cancelled after {event.completion_tokens} tokens",
            {"completion_tokens": event.completion_tokens},
            request_id=event.request_id,
        )
    return error_for_code(event.code, event.message, event.details, request_id=event.request_id)


def error_for_code(
    code: str, message: str, details: Mapping[str, Any] | None = None, *, request_id: str | None = None
) -> LayermuxClientError:
    """The typed exception of a protocol error code (an error event's, or an arq job's failure)."""
    cls = _ERROR_CLASSES.get(code, RejectedError)
    return cls(code, message, details, request_id=request_id)


def result_from_terminal(event: TerminalEvent) -> Result:
    """The Result of a `done` event; raises the typed error of any other terminal event."""
    if isinstance(event, DoneEvent):
        return Result(
            text=event.text,
            token_ids=list(event.token_ids),
            finish_reason=event.finish_reason,
            usage=event.usage,
        )
    raise error_for_terminal(event)


class ReplyCursor:
    """Position in one request's reply stream; feed it entries in stream order."""

    __slots__ = ("_chars_at", "_text_chars", "last_id", "next_index", "request_id", "terminal")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.last_id = "0-0"  # XREAD returns entries strictly after this id
        self.next_index = 0  # index of the next token the caller has not seen
        self.terminal: TerminalEvent | None = None
        self._text_chars = 0  # characters of text delivered so far
        self._chars_at: dict[int, int] = {0: 0}  # token index where a delivered event started -> chars before it

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def accept(self, entry_id: str, fields: Mapping[Any, Any]) -> Event | None:
        """Consume one stream entry; return its event, or None for an already-delivered token event.

        The position advances even when the entry is invalid, so one bad entry raises once
        and does not wedge the reader.
        """
        assert self.terminal is None, "no entry is read after the terminal event"
        self.last_id = entry_id
        raw = _data_field(fields)
        if raw is None:
            raise ProtocolError(
                "invalid_event",
                f"entry {entry_id}: expected a 'data' field, found {len(fields)} other field(s)",
                request_id=self.request_id,
            )
        event = decode_event(raw)
        if event.request_id != self.request_id:
            raise ProtocolError(
                "invalid_event",
                f"entry {entry_id}: request_id: expected {self.request_id!r}, found {event.request_id!r}",
                request_id=self.request_id,
            )
        if isinstance(event, TokenEvent):
            return self._accept_tokens(entry_id, event)
        if isinstance(event, DoneEvent | ErrorEvent | CancelledEvent):
            self.terminal = event
        return event

    def _accept_tokens(self, entry_id: str, event: TokenEvent) -> TokenEvent | None:
        end = event.index + len(event.token_ids)
        if end <= self.next_index:
            # A takeover replayed tokens the caller already has. Where it ends is a boundary the next
            # replayed event may start at (the run that lost its events coalesced them differently):
            # remember how much text lies before it, so that event can be cut too.
            if event.index in self._chars_at:
                self._chars_at.setdefault(end, self._chars_at[event.index] + len(event.text))
            return None
        if event.index < self.next_index and event.index in self._chars_at:
            # Partly new: keep the tokens and the text after what the caller already has.
            skip_chars = self._text_chars - self._chars_at[event.index]
            event = TokenEvent(request_id=event.request_id, index=self.next_index,
                               token_ids=event.token_ids[self.next_index - event.index:], text=event.text[skip_chars:])
        if event.index != self.next_index:
            raise ProtocolError(
                "invalid_event",
                f"entry {entry_id}: token index: expected {self.next_index}, found {event.index} "
                f"(with {len(event.token_ids)} tokens)",
                request_id=self.request_id,
            )
        self._chars_at[event.index] = self._text_chars
        self._text_chars += len(event.text)
        self.next_index = end
        return event


def _data_field(fields: Mapping[Any, Any]) -> bytes | str | None:
    # Our own clients return bytes; a caller-supplied client may use decode_responses=True.
    value = fields.get(b"data", fields.get("data"))
    return value if isinstance(value, bytes | str) else None
