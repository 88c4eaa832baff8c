"""The engine's exception tree (one place; raised by engine._core and the Python facade).

    LayermuxError                 every engine error
    ├── ModelFileError            a model file is missing, corrupt, truncated or disagrees with config.json
    ├── UnsupportedModelError     a valid model asks for what layermux does not implement (architecture, dtype, rope type)
    ├── InvalidRequestError       a caller's value is out of range (also a ValueError): bad token ids, sampling params
    │   └── ChatTemplateError     the model's chat template failed or tried to leave its sandbox
    ├── CapacityError             a model's bytes cannot be booked in the device ledger (message carries the numbers)
    └── RequestFailedError        a submitted request ended with an error event; .code is its engine ErrorCode

Running out of KV space while serving is not an error: the engine preempts and resumes. A request
whose KV can never fit ends with ErrorCode.kv_exceeds_budget (an event, not an exception).
"""

from __future__ import annotations

from engine._core import (
    CapacityError,
    ErrorCode,
    InvalidRequestError,
    LayermuxError,
    ModelFileError,
    UnsupportedModelError,
)


class ChatTemplateError(InvalidRequestError):
    """The chat template raised, referenced something undefined, or tried to escape the sandbox."""


class RequestFailedError(LayermuxError):
    """A request ended with an engine error event (Engine.generate); `code` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.detail = message


__all__ = [
    "CapacityError",
    "ChatTemplateError",
    "InvalidRequestError",
    "LayermuxError",
    "ModelFileError",
    "RequestFailedError",
    "UnsupportedModelError",
]
