"""Owns: the wire schema of protocol v1 (request messages, reply events), its limits, and its codec.
Changed by: protocol changes only, together with docs/protocol.md; the worker imports this module.
Thread-safety: models are frozen pydantic objects and the codec functions are pure.

Producers and workers share this one definition. Every message is one JSON object encoded with
orjson. Validation is strict: no type coercion ("5" is not 5, true is not 1), unknown fields are
refused, every number is range-checked, and NaN/Infinity never pass. Decoding never raises
anything but `ProtocolError`, whose message names the field, what was expected, and what was
found.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeAlias

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .errors import ProtocolError
from .keys import MODEL_NAME_PATTERN, REQUEST_ID_PATTERN

__all__ = [
    "CANCEL_TTL_S",
    "EVENT_TYPES",
    "MAX_MESSAGES",
    "MAX_PAYLOAD_BYTES",
    "MAX_PRIORITY",
    "MAX_PROMPT_BYTES",
    "MAX_PROMPT_IDS",
    "MAX_SEED",
    "MAX_STOP",
    "MAX_STOP_CHARS",
    "MIN_PRIORITY",
    "PROTOCOL_VERSION",
    "REPLY_TTL_S",
    "CancelledEvent",
    "ChatMessage",
    "DoneEvent",
    "ErrorCode",
    "ErrorEvent",
    "Event",
    "FinishReason",
    "RequestMessage",
    "SamplingParamsModel",
    "StartedEvent",
    "TerminalEvent",
    "TokenEvent",
    "Usage",
    "decode_event",
    "decode_request",
    "encode_event",
    "encode_request",
    "validate_request",
]

PROTOCOL_VERSION: Final = 1

# Limits. A request outside them is refused before it costs a worker anything.
MAX_PROMPT_BYTES: Final = 1 << 20  # UTF-8 bytes of `prompt`, or of all `messages` roles+contents
MAX_PROMPT_IDS: Final = MAX_PROMPT_BYTES // 4  # tokens in `prompt_ids`
MAX_MESSAGES: Final = 1024  # entries in `messages`
MAX_ROLE_CHARS: Final = 64
MAX_STOP: Final = 16  # stop strings per request
MAX_STOP_CHARS: Final = 256  # characters per stop string
MAX_SEED: Final = (1 << 63) - 1
MIN_PRIORITY: Final = -100
MAX_PRIORITY: Final = 100
MAX_INT32: Final = (1 << 31) - 1  # counts and token ids cross into the C++ engine as int32
# Largest encoded message decode_request/decode_event will parse. JSON escaping can inflate a
# 1 MiB prompt up to 6x (control characters become \u00XX), so this is generous on purpose.
MAX_PAYLOAD_BYTES: Final = 8 << 20

# Lifetimes of keys written by the protocol's parties.
REPLY_TTL_S: Final = 3600  # default EXPIRE of a reply stream, refreshed on every write
CANCEL_TTL_S: Final = 86400  # EXPIRE of a model's cancel set, refreshed on every SADD


class ErrorCode(StrEnum):
    """Codes of `error` events (queue_full is only ever raised at submit, never published)."""

    QUEUE_FULL = "queue_full"
    UNKNOWN_MODEL = "unknown_model"
    PROMPT_TOO_LONG = "prompt_too_long"
    KV_EXCEEDS_BUDGET = "kv_exceeds_budget"
    MAX_TOKENS_OVER_LIMIT = "max_tokens_over_limit"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    WORKER_FAILURE = "worker_failure"
    DEAD_LETTER = "dead_letter"


FinishReason: TypeAlias = Literal["stop", "length", "stop_string"]

ModelName = Annotated[str, StringConstraints(pattern=f"^{MODEL_NAME_PATTERN}$")]
RequestId = Annotated[str, StringConstraints(pattern=f"^{REQUEST_ID_PATTERN}$")]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
Count = Annotated[int, Field(ge=0, le=MAX_INT32)]
Millis = Annotated[float, Field(ge=0.0)]
UnixTime = Annotated[float, Field(gt=0.0)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


def _json_scalar(value: object) -> object:
    if value is None or isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise ValueError(f"expected a number, string, boolean or null, found {_preview(value)}")


JsonScalar: TypeAlias = Annotated[bool | int | float | str | None, PlainValidator(_json_scalar)]


class _Wire(BaseModel):
    """Common configuration: strict types, no unknown fields, immutable, finite floats."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Versioned(_Wire):
    v: Literal[1] = PROTOCOL_VERSION

    @field_validator("v", mode="before")
    @classmethod
    def _v_is_an_integer(cls, value: object) -> object:
        # Literal[1] alone would accept True (True == 1 in Python).
        if type(value) is not int:
            raise ValueError(f"expected {PROTOCOL_VERSION}, found {_preview(value)}")
        return value


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"expected valid Unicode text in {what}, found a lone surrogate") from e


class ChatMessage(_Wire):
    """One chat turn; the worker's chat template decides which roles it accepts."""

    role: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ROLE_CHARS)]
    content: str


class SamplingParamsModel(_Wire):
    """Sampling parameters. `seed` is required on the wire: a takeover must regenerate the same tokens."""

    max_tokens: int = Field(128, ge=1, le=MAX_INT32)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_INT32)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = Field(ge=0, le=MAX_SEED)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    ignore_eos: bool = False


class RequestMessage(_Versioned):
    """One request, as stored in field `data` of a model's request stream."""

    request_id: RequestId
    model: ModelName
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt_ids: list[TokenId] | None = Field(None, min_length=1, max_length=MAX_PROMPT_IDS)
    params: SamplingParamsModel
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    deadline_at: UnixTime | None = None
    submitted_at: UnixTime

    @field_validator("prompt")
    @classmethod
    def _prompt_fits(cls, prompt: str | None) -> str | None:
        if prompt is None:
            return None
        if not prompt:
            raise ValueError("expected a non-empty string, found ''")
        n_bytes = _utf8_len(prompt, "prompt")
        if n_bytes > MAX_PROMPT_BYTES:
            raise ValueError(f"expected at most {MAX_PROMPT_BYTES} UTF-8 bytes, found {n_bytes}")
        return prompt

    @field_validator("messages")
    @classmethod
    def _messages_fit(cls, messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if messages is None:
            return None
        n_bytes = sum(_utf8_len(m.role, "role") + _utf8_len(m.content, "content") for m in messages)
        if n_bytes > MAX_PROMPT_BYTES:
            raise ValueError(f"expected at most {MAX_PROMPT_BYTES} UTF-8 bytes of roles and contents, found {n_bytes}")
        return messages

    @model_validator(mode="after")
    def _exactly_one_prompt_form(self) -> RequestMessage:
        given = [
            name
            for name, value in (
                ("prompt", self.prompt),
                ("messages", self.messages),
                ("prompt_ids", self.prompt_ids),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "expected exactly one of prompt, messages, prompt_ids, "
                f"found {len(given)}{' (' + ', '.join(given) + ')' if given else ''}"
            )
        return self


class Usage(_Wire):
    """Token counts and timings of a finished request."""

    prompt_tokens: Count
    completion_tokens: Count
    queue_ms: Millis
    prefill_ms: Millis
    decode_ms: Millis
    total_ms: Millis


class StartedEvent(_Versioned):
    """A worker began the request (again, with attempt + 1, after a takeover)."""

    type: Literal["started"] = "started"
    request_id: RequestId
    worker: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    attempt: int = Field(ge=1, le=MAX_INT32)
    prompt_tokens: Count


class TokenEvent(_Versioned):
    """Tokens [index, index + len(token_ids)) of the completion and their text."""

    type: Literal["token"] = "token"
    request_id: RequestId
    index: Count
    token_ids: list[TokenId] = Field(min_length=1)
    text: str


class DoneEvent(_Versioned):
    """Terminal: the completion finished normally."""

    type: Literal["done"] = "done"
    request_id: RequestId
    finish_reason: FinishReason
    text: str
    token_ids: list[TokenId]
    usage: Usage


class ErrorEvent(_Versioned):
    """Terminal: the request failed; `code` is an `ErrorCode` (or a newer one) and `details` has the numbers."""

    type: Literal["error"] = "error"
    request_id: RequestId
    code: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    message: str
    details: dict[str, JsonScalar] = Field(default_factory=dict)


class CancelledEvent(_Versioned):
    """Terminal: the request was cancelled after `completion_tokens` tokens."""

    type: Literal["cancelled"] = "cancelled"
    request_id: RequestId
    completion_tokens: Count


Event: TypeAlias = Annotated[
    StartedEvent | TokenEvent | DoneEvent | ErrorEvent | CancelledEvent,
    Field(discriminator="type"),
]
TerminalEvent: TypeAlias = DoneEvent | ErrorEvent | CancelledEvent

EVENT_TYPES: Final = ("started", "token", "done", "error", "cancelled")
_EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)


# -- codec -------------------------------------------------------------------------------------


def encode_request(message: RequestMessage) -> bytes:
    """The bytes stored in field `data` of a request stream entry."""
    return orjson.dumps(message.model_dump())


def encode_event(event: StartedEvent | TokenEvent | DoneEvent | ErrorEvent | CancelledEvent) -> bytes:
    """The bytes stored in field `data` of a reply stream entry."""
    return orjson.dumps(event.model_dump())


def decode_request(raw: bytes | bytearray | memoryview | str) -> RequestMessage:
    """Parse and validate one request message.

    Raises ProtocolError("unsupported_version") when `v` is not 1 and
    ProtocolError("invalid_request") for anything else wrong; never any other exception.
    """
    return validate_request(_load_object(raw, "invalid_request"))


def validate_request(obj: Mapping[str, Any]) -> RequestMessage:
    """Validate an already-parsed request object (a missing `v` means 1).

    Raises ProtocolError("invalid_request") with the same wording as decode_request.
    """
    try:
        return RequestMessage.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError("invalid_request", _describe_all(e)) from e


def decode_event(raw: bytes | bytearray | memoryview | str) -> Event:
    """Parse and validate one reply event (one of the five event models, chosen by `type`).

    Raises ProtocolError("unsupported_version") when `v` is not 1 and
    ProtocolError("invalid_event") for anything else wrong; never any other exception.
    """
    obj = _load_object(raw, "invalid_event")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        found = "nothing" if "type" not in obj else _preview(kind)
        raise ProtocolError("invalid_event", f"type: expected one of {', '.join(EVENT_TYPES)}, found {found}")
    try:
        return _EVENT_ADAPTER.validate_python(obj)
    except ValidationError as e:
        raise ProtocolError("invalid_event", _describe_all(e)) from e


def _load_object(raw: bytes | bytearray | memoryview | str, code: str) -> dict[str, Any]:
    """JSON-decode `raw` into an object whose `v` is exactly 1, or raise ProtocolError(code)."""
    if not isinstance(raw, bytes | bytearray | memoryview | str):
        raise ProtocolError(code, f"message: expected bytes or str, found {type(raw).__name__}")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(code, f"message: expected at most {MAX_PAYLOAD_BYTES} bytes, found {len(raw)}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(code, f"message: expected a JSON object, found invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ProtocolError(code, f"message: expected a JSON object, found {_preview(obj)}")
    if "v" not in obj:
        raise ProtocolError(code, "v: required field missing (expected 1)")
    version = obj["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"v: expected {PROTOCOL_VERSION} (this side speaks protocol v{PROTOCOL_VERSION}), "
            f"found {_preview(version)}",
        )
    return obj


# -- error messages ----------------------------------------------------------------------------

_MAX_ERRORS_LISTED: Final = 3
_PREVIEW_CHARS: Final = 60


def _preview(value: object) -> str:
    """A short, never-recursive description of an input value."""
    if isinstance(value, dict):
        return f"an object with {len(value)} field(s)"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | bytes | bool | int | float) or value is None:
        text = repr(value)
        return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."
    return type(value).__name__


def _describe(error: ErrorDetails) -> str:
    """'<field>: expected <what>, found <what>' for one pydantic error."""
    where = ".".join(str(part) for part in error["loc"]) or "message"
    kind = error["type"]
    if kind == "missing":
        return f"{where}: required field missing"
    if kind == "extra_forbidden":
        return f"{where}: unknown field (not part of protocol v{PROTOCOL_VERSION})"
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # decode_event checks first; backstop
        return f"{where or 'type'}: expected one of {', '.join(EVENT_TYPES)}"
    text = error["msg"].removeprefix("Value error, ").replace(" after validation", "")
    text = re.sub(r", not \d+$", "", text)
    head, sep, tail = text.partition(" should be ")
    if sep and " " not in head:
        text = "expected " + tail
    else:
        head, sep, tail = text.partition(" should ")
        if sep and " " not in head:
            text = "expected to " + tail
    if not text.startswith("expected"):
        text = "expected " + text
    if "found" in text:
        return f"{where}: {text}"
    return f"{where}: {text}, found {_preview(error['input'])}"


def _describe_all(error: ValidationError) -> str:
    details = error.errors(include_url=False)
    parts = [_describe(d) for d in details[:_MAX_ERRORS_LISTED]]
    if len(details) > _MAX_ERRORS_LISTED:
        parts.append(f"and {len(details) - _MAX_ERRORS_LISTED} more")
    return "; ".join(parts)
