"""Owns: the OpenAI request and response bodies the gateway speaks (pydantic models), and how a
request body becomes SDK submit() arguments.
Changed by: whoever adds an OpenAI parameter; README.md ("OpenAI-compatible gateway") lists them.
Thread-safety: models are immutable pydantic objects; functions are pure.

Requests are parsed the way OpenAI's API parses them: fields it does not know are ignored
(agent frameworks send `tools`, `response_format`, `metadata`, ...), but a known field of the
wrong type is a 400 that names it (`max_tokens: expected an integer, found '5'`). Types are
strict: a string is never read as a number, a boolean never as an integer; an integer is
accepted where a float is expected, as JSON has one number type.

layermux extras, accepted on both endpoints: `priority` (-100..100), `deadline_ms` (the
request fails with 504 if it has not finished by then, queue time included), `request_id`
(idempotency: re-sending a request_id returns the request already queued or running instead
of running it twice; with n > 1 the choices use `<request_id>:<i>`) and `ignore_eos` (as vLLM's).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeAlias, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from producer_sdk.keys import REQUEST_ID_PATTERN
from producer_sdk.protocol import MAX_PRIORITY, MAX_SEED, MAX_STOP, MIN_PRIORITY

from .errors import ApiError

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Completion",
    "CompletionChunk",
    "CompletionRequest",
    "UsageOut",
    "finish_reason_out",
    "parse_body",
]

_T = TypeVar("_T", bound="_In")

MAX_N = 16  # choices per request (each is one queued layermux request)


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True, allow_inf_nan=False)


class ContentPart(_In):
    type: str
    text: str | None = None


class ChatMessageIn(_In):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: str | list[ContentPart] | None = None

    def text(self, where: str) -> str:
        """The message's text; array content must be text parts only."""
        if self.content is None:
            return ""  # an assistant turn that only called tools
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"{where}.content[{j}].type: expected 'text' (layermux models read text only), "
                               f"found {part.type!r}", param=f"{where}.content")
            pieces.append(part.text)
        return "".join(pieces)


class StreamOptions(_In):
    include_usage: bool = False


StopIn: TypeAlias = str | Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=MAX_STOP)]


class _Common(_In):
    """Parameters both endpoints share."""

    model: Annotated[str, StringConstraints(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: StopIn | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # layermux extras
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    deadline_ms: float | None = Field(None, gt=0.0)
    request_id: Annotated[str, StringConstraints(pattern=f"^{REQUEST_ID_PATTERN}$", max_length=120)] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "":
            return None  # some clients send "" for "no stop"
        return stop

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        """SDK submit() keyword arguments for one choice (seed and request_id are per choice)."""
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "stop": self.stop_list(),
            "priority": self.priority,
            "deadline_s": None if self.deadline_ms is None else self.deadline_ms / 1000.0,
            "ignore_eos": self.ignore_eos,
        }

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system turn; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")}
                for i, m in enumerate(self.messages)]


PromptIn: TypeAlias = (
    Annotated[str, StringConstraints(min_length=1)]
    | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    | Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1, max_length=MAX_N)]
    | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
                Field(min_length=1, max_length=MAX_N)]
)


class CompletionRequest(_Common):
    prompt: PromptIn
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[dict[str, Any]]:
        """One SDK prompt argument per prompt: {"prompt": text} or {"prompt_ids": ids}."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_ids": list(p)}]
        if all(isinstance(x, str) for x in p):
            return [{"prompt": x} for x in p]
        return [{"prompt_ids": list(x)} for x in p]  # type: ignore[arg-type]


# -- responses ----------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class UsageOut(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReasonOut: TypeAlias = Literal["stop", "length"] | None


def finish_reason_out(reason: str) -> Literal["stop", "length"]:
    """layermux finish reasons -> OpenAI's: a stop string and end-of-sequence are both "stop"."""
    return "length" if reason == "length" else "stop"


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReasonOut


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class ChunkChoice(_Out):
    index: int
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": ...}, {} at the end
    logprobs: None = None
    finish_reason: FinishReasonOut = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None


class TextChoice(_Out):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReasonOut


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut


class CompletionChunk(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageOut | None = None


# -- parsing -------------------------------------------------------------------------------------


def parse_body(cls: type[_T], body: object) -> _T:
    """Validate a decoded JSON body; ApiError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, found {_kind(body)}")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # A union (prompt, stop, content) reports one error per member; the shortest path is the field.
        first = min(errors, key=lambda d: len(d["loc"]))
        param = _param(first["loc"])
        raise ApiError(400, f"{param}: {_expected(first)}", param=param) from None


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_]+", part) and part not in _UNION_TAGS:  # skip tags such as "str", "list[int]"
            out += ("." if out else "") + part
    return out or "body"


def _expected(error: Any) -> str:
    if error["type"] == "missing":
        return "required field missing"
    msg = str(error["msg"]).removeprefix("Value error, ")
    _, sep, tail = msg.partition(" should be ")
    text = f"expected {tail}" if sep else msg[0].lower() + msg[1:]
    return f"{text}, found {_kind(error.get('input'))}"


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)} item(s)"
    text = repr(value) if value is not None else "null"
    return text if len(text) <= 40 else text[:37] + "..."
