"""layermux producer SDK: submit prompts to layermux workers through Redis and read the replies.
Owns the public API below; the wire schema (protocol), key names (keys) and the enqueue script
are also what the worker imports. Pure Python: redis, orjson, pydantic; no compiler needed.

    from producer_sdk import Producer

    with Producer("redis://localhost:6379/0") as producer:
        handle = producer.submit("smollm2-360m", prompt="Once upon a time", max_tokens=64)
        print(handle.result(timeout=60).text)
"""

from .client import AsyncProducer, Producer, build_request
from .enqueue import EnqueueOutcome, enqueue_args, enqueue_keys, enqueue_script_source, parse_enqueue_reply
from .errors import (
    DeadlineExceededError,
    LayermuxClientError,
    ProtocolError,
    QueueFullError,
    RejectedError,
    RequestCancelledError,
    RequestTimeoutError,
    UnknownModelError,
    WorkerFailureError,
)
from .handle import AsyncHandle, Handle
from .keys import CONSUMER_GROUP, PRIORITY_BANDS, Keys, priority_band
from .protocol import (
    PROTOCOL_VERSION,
    CancelledEvent,
    ChatMessage,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    RequestMessage,
    SamplingParamsModel,
    StartedEvent,
    TerminalEvent,
    TokenEvent,
    Usage,
    decode_event,
    decode_request,
    encode_event,
    encode_request,
    validate_request,
)
from .reply import Result

__all__ = [
    "CONSUMER_GROUP",
    "PRIORITY_BANDS",
    "PROTOCOL_VERSION",
    "AsyncHandle",
    "AsyncProducer",
    "CancelledEvent",
    "ChatMessage",
    "DeadlineExceededError",
    "DoneEvent",
    "EnqueueOutcome",
    "ErrorCode",
    "ErrorEvent",
    "Event",
    "Handle",
    "Keys",
    "LayermuxClientError",
    "Producer",
    "ProtocolError",
    "QueueFullError",
    "RejectedError",
    "RequestCancelledError",
    "RequestMessage",
    "RequestTimeoutError",
    "Result",
    "SamplingParamsModel",
    "StartedEvent",
    "TerminalEvent",
    "TokenEvent",
    "UnknownModelError",
    "Usage",
    "WorkerFailureError",
    "build_request",
    "decode_event",
    "decode_request",
    "encode_event",
    "encode_request",
    "enqueue_args",
    "enqueue_keys",
    "enqueue_script_source",
    "parse_enqueue_reply",
    "priority_band",
    "validate_request",
]

__version__ = "0.1.0"
