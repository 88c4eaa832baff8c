"""Schema tests of protocol v1 (producer_sdk.protocol): every field and range, versions, round trips,
and a fuzz test that decoding never raises anything but ProtocolError. No Redis needed.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer_sdk import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    ProtocolError,
    RequestMessage,
    StartedEvent,
    TokenEvent,
    decode_event,
    decode_request,
    encode_event,
    encode_request,
    validate_request,
)
from producer_sdk.protocol import MAX_MESSAGES, MAX_PROMPT_BYTES, MAX_PROMPT_IDS, MAX_SEED, MAX_STOP, MAX_STOP_CHARS


def fuzz(n_examples: int) -> settings:
    return settings(max_examples=n_examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def valid_request(**overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1,
        "request_id": "req-1",
        "model": "smollm2-360m",
        "prompt": "Hello",
        "messages": None,
        "prompt_ids": None,
        "params": {"seed": 42},
        "priority": 0,
        "deadline_at": None,
        "submitted_at": 1_700_000_000.5,
    }
    message.update(overrides)
    return message


def with_params(**params: Any) -> dict[str, Any]:
    return valid_request(params={"seed": 42, **params})


def decode_error(message: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(orjson.dumps(message))
    return info.value


# -- requests: valid forms and round trips ----------------------------------------------------


def test_minimal_request_gets_documented_defaults() -> None:
    message = decode_request(orjson.dumps(valid_request()))
    params = message.params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (128, 1.0, 1.0, 0)
    assert (params.min_p, params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (
        0.0,
        1.0,
        0.0,
        0.0,
    )
    assert params.stop == [] and params.ignore_eos is False and params.seed == 42
    assert message.priority == 0 and message.deadline_at is None and message.v == 1


@pytest.mark.parametrize(
    "form",
    [
        {"prompt": "Hi ☃ — 你好"},
        {"prompt": None, "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]},
        {"prompt": None, "prompt_ids": [1, 2, 3, 2**31 - 1]},
    ],
)
def test_each_prompt_form_round_trips(form: dict[str, Any]) -> None:
    original = valid_request(**form, deadline_at=1_700_000_060.25, priority=-7)
    message = decode_request(orjson.dumps(original))
    assert orjson.loads(encode_request(message)) == {**original, "params": message.params.model_dump()}
    assert decode_request(encode_request(message)) == message


def test_boundary_values_are_accepted() -> None:
    message = decode_request(
        orjson.dumps(
            valid_request(
                prompt="é" * (MAX_PROMPT_BYTES // 2),  # exactly MAX_PROMPT_BYTES UTF-8 bytes
                priority=100,
                params={
                    "max_tokens": 1,
                    "temperature": 0,
                    "top_p": 1.0,
                    "top_k": 0,
                    "min_p": 1.0,
                    "repetition_penalty": 1e-9,
                    "presence_penalty": -2.0,
                    "frequency_penalty": 2.0,
                    "seed": MAX_SEED,
                    "stop": ["x" * MAX_STOP_CHARS] * MAX_STOP,
                    "ignore_eos": True,
                },
            )
        )
    )
    assert message.params.seed == MAX_SEED and message.priority == 100
    assert decode_request(orjson.dumps(valid_request(priority=-100, params={"seed": 0}))).params.seed == 0
    assert (
        len(decode_request(orjson.dumps(valid_request(prompt=None, prompt_ids=[0] * MAX_PROMPT_IDS))).prompt_ids or [])
        == MAX_PROMPT_IDS
    )


# -- requests: every field validated ----------------------------------------------------------

BAD_PARAMS = [
    ("max_tokens", 0, "params.max_tokens"),
    ("max_tokens", 1.5, "params.max_tokens"),
    ("max_tokens", "5", "params.max_tokens"),
    ("max_tokens", True, "params.max_tokens"),
    ("max_tokens", 2**31, "params.max_tokens"),
    ("temperature", -0.01, "params.temperature"),
    ("temperature", "hot", "params.temperature"),
    ("top_p", 0.0, "params.top_p"),
    ("top_p", 1.0001, "params.top_p"),
    ("top_k", -1, "params.top_k"),
    ("top_k", 1.0, "params.top_k"),
    ("min_p", -0.01, "params.min_p"),
    ("min_p", 1.01, "params.min_p"),
    ("repetition_penalty", 0.0, "params.repetition_penalty"),
    ("repetition_penalty", -1.0, "params.repetition_penalty"),
    ("presence_penalty", -2.01, "params.presence_penalty"),
    ("presence_penalty", 2.01, "params.presence_penalty"),
    ("frequency_penalty", -2.01, "params.frequency_penalty"),
    ("frequency_penalty", 2.01, "params.frequency_penalty"),
    ("seed", -1, "params.seed"),
    ("seed", 2**63, "params.seed"),
    ("seed", "7", "params.seed"),
    ("seed", None, "params.seed"),
    ("stop", ["s"] * (MAX_STOP + 1), "params.stop"),
    ("stop", ["x" * (MAX_STOP_CHARS + 1)], "params.stop.0"),
    ("stop", [""], "params.stop.0"),
    ("stop", "END", "params.stop"),
    ("stop", [1], "params.stop.0"),
    ("ignore_eos", 1, "params.ignore_eos"),
    ("ignore_eos", "true", "params.ignore_eos"),
    ("surprise", 1, "params.surprise"),
]


@pytest.mark.parametrize(("field", "value", "where"), BAD_PARAMS)
def test_each_sampling_parameter_is_range_checked(field: str, value: Any, where: str) -> None:
    error = decode_error(with_params(**{field: value}))
    assert error.code == "invalid_request"
    assert error.message.startswith(where + ":"), error.message
    if field != "surprise":
        assert "expected" in error.message and "found" in error.message, error.message


def test_seed_is_required_on_the_wire() -> None:
    error = decode_error(valid_request(params={}))
    assert error.message == "params.seed: required field missing"


BAD_TOP_LEVEL = [
    ({"request_id": ""}, "request_id"),
    ({"request_id": "has space"}, "request_id"),
    ({"request_id": "{tag}"}, "request_id"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"request_id": 12}, "request_id"),
    ({"model": ""}, "model"),
    ({"model": "a:b"}, "model"),
    ({"model": "m" * 65}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, "prompt"),
    ({"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": None, "messages": []}, "messages"),
    ({"prompt": None, "messages": [{"role": "", "content": "x"}]}, "messages.0.role"),
    ({"prompt": None, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"prompt": None, "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"prompt": None, "messages": ["hello"]}, "messages.0"),
    ({"prompt": None, "messages": [{"role": "u", "content": ""}] * (MAX_MESSAGES + 1)}, "messages"),
    ({"prompt": None, "messages": [{"role": "user", "content": "x" * (MAX_PROMPT_BYTES // 2)}] * 2}, "messages"),
    ({"prompt": None, "prompt_ids": []}, "prompt_ids"),
    ({"prompt": None, "prompt_ids": [-1]}, "prompt_ids.0"),
    ({"prompt": None, "prompt_ids": [2**31]}, "prompt_ids.0"),
    ({"prompt": None, "prompt_ids": ["1"]}, "prompt_ids.0"),
    ({"prompt": None, "prompt_ids": [0] * (MAX_PROMPT_IDS + 1)}, "prompt_ids"),
    ({"prompt": None}, "message"),
    ({"messages": [{"role": "user", "content": "x"}]}, "message"),
    ({"prompt_ids": [1], "messages": [{"role": "user", "content": "x"}]}, "message"),
    ({"priority": 101}, "priority"),
    ({"priority": -101}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"deadline_at": 0}, "deadline_at"),
    ({"deadline_at": -5.0}, "deadline_at"),
    ({"deadline_at": "soon"}, "deadline_at"),
    ({"submitted_at": 0}, "submitted_at"),
    ({"submitted_at": None}, "submitted_at"),
    ({"params": None}, "params"),
    ({"params": [42]}, "params"),
    ({"extra": "field"}, "extra"),
]


@pytest.mark.parametrize(("overrides", "where"), BAD_TOP_LEVEL)
def test_each_request_field_is_validated(overrides: dict[str, Any], where: str) -> None:
    error = decode_error(valid_request(**overrides))
    assert error.code == "invalid_request"
    assert error.message.startswith(where + ":"), error.message


def test_error_message_names_field_expectation_and_value() -> None:
    error = decode_error(with_params(top_p=1.5))
    assert str(error) == "invalid_request: params.top_p: expected less than or equal to 1, found 1.5"
    error = decode_error(valid_request(prompt=None, prompt_ids=[1], messages=[{"role": "user", "content": "x"}]))
    assert (
        error.message == "message: expected exactly one of prompt, messages, prompt_ids, found 2 (messages, prompt_ids)"
    )


def test_missing_required_fields_are_named() -> None:
    message = valid_request()
    del message["request_id"], message["model"]
    error = decode_error(message)
    assert "request_id: required field missing" in error.message
    assert "model: required field missing" in error.message


def test_unknown_top_level_field_is_rejected() -> None:
    error = decode_error(valid_request(priority_boost=3))
    assert error.message == "priority_boost: unknown field (not part of protocol v1)"


@pytest.mark.parametrize("version", [2, 0, -1, "1", 1.0, True, None, [1]])
def test_other_versions_are_rejected_as_unsupported(version: Any) -> None:
    error = decode_error(valid_request(v=version))
    assert error.code == "unsupported_version"
    assert error.message.startswith("v: expected 1") and "found" in error.message


def test_missing_version_is_an_invalid_request() -> None:
    message = valid_request()
    del message["v"]
    error = decode_error(message)
    assert (error.code, error.message) == ("invalid_request", "v: required field missing (expected 1)")


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b"null", b'"text"', b"42", b"\xff\xfe", b"NaN", b'{"v": 1e400}', b'{"v":1,"prompt":"\\ud800"}'],
)
def test_non_object_or_broken_json_is_an_invalid_request(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert info.value.code == "invalid_request"
    assert info.value.message.startswith(("message: expected a JSON object", "v:", "request_id:")), info.value.message


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="expected at most"):
        decode_request(b" " * (9 << 20))


def test_python_side_validation_rejects_nan_and_lone_surrogates() -> None:
    with pytest.raises(ProtocolError, match=r"params\.temperature"):
        validate_request(with_params(temperature=float("nan")))
    with pytest.raises(ProtocolError, match="lone surrogate"):
        validate_request(valid_request(prompt="a\ud800b"))


def test_protocol_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode_request(b"{}")


# -- events -----------------------------------------------------------------------------------

USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 3,
    "queue_ms": 1.5,
    "prefill_ms": 2.0,
    "decode_ms": 3.0,
    "total_ms": 6.5,
}
EVENTS: list[tuple[type[Any], dict[str, Any]]] = [
    (StartedEvent, {"type": "started", "worker": "w-1", "attempt": 1, "prompt_tokens": 5}),
    (TokenEvent, {"type": "token", "index": 0, "token_ids": [7, 8], "text": "ab"}),
    (DoneEvent, {"type": "done", "finish_reason": "length", "text": "abc", "token_ids": [7, 8, 9], "usage": USAGE}),
    (
        ErrorEvent,
        {"type": "error", "code": "kv_exceeds_budget", "message": "no room", "details": {"needed": 10, "available": 4}},
    ),
    (CancelledEvent, {"type": "cancelled", "completion_tokens": 2}),
]


@pytest.mark.parametrize(("cls", "body"), EVENTS)
def test_each_event_type_decodes_to_its_model_and_round_trips(cls: type[Any], body: dict[str, Any]) -> None:
    raw = orjson.dumps({"v": 1, "request_id": "req-1", **body})
    event = decode_event(raw)
    assert type(event) is cls
    assert orjson.loads(encode_event(event)) == orjson.loads(raw)
    assert decode_event(encode_event(event)) == event


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"type": "token", "index": 0, "token_ids": [], "text": ""}, "token.token_ids"),
        ({"type": "token", "index": -1, "token_ids": [1], "text": ""}, "token.index"),
        ({"type": "started", "worker": "w", "attempt": 0, "prompt_tokens": 1}, "started.attempt"),
        ({"type": "done", "finish_reason": "eos", "text": "", "token_ids": [], "usage": USAGE}, "done.finish_reason"),
        (
            {"type": "done", "finish_reason": "stop", "text": "", "token_ids": [], "usage": {**USAGE, "queue_ms": -1}},
            "done.usage.queue_ms",
        ),
        ({"type": "error", "code": "", "message": "m"}, "error.code"),
        ({"type": "error", "code": "x", "message": "m", "details": {"nested": {"a": 1}}}, "error.details.nested"),
        ({"type": "cancelled", "completion_tokens": 0, "why": "user"}, "cancelled.why"),
        ({"type": "progress"}, "type"),
        ({}, "type"),
    ],
)
def test_invalid_events_are_rejected_naming_the_field(body: dict[str, Any], where: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_event(orjson.dumps({"v": 1, "request_id": "req-1", **body}))
    assert info.value.code == "invalid_event"
    assert info.value.message.startswith(where + ":"), info.value.message


def test_event_with_other_version_is_unsupported() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_event(
            orjson.dumps({"v": 2, "type": "token", "request_id": "r", "index": 0, "token_ids": [1], "text": ""})
        )
    assert info.value.code == "unsupported_version"


# -- fuzz -------------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=6,
)
REQUEST_FIELDS = [*valid_request(), "type", "index", "token_ids", "text", "code"]
PARAM_FIELDS = list(with_params(max_tokens=1, temperature=1.0, top_p=1.0, top_k=0, stop=[])["params"])


def _decodes_or_protocol_error(raw: bytes) -> None:
    try:
        message = decode_request(raw)
    except ProtocolError as e:
        assert e.code in ("invalid_request", "unsupported_version") and e.message
    else:
        assert decode_request(encode_request(message)) == message
    try:
        decode_event(raw)
    except ProtocolError as e:
        assert e.code in ("invalid_event", "unsupported_version") and e.message


@fuzz(5000)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_ever_raise_protocol_error(raw: bytes) -> None:
    _decodes_or_protocol_error(raw)


@fuzz(1500)
@given(
    st.dictionaries(
        st.sampled_from(REQUEST_FIELDS) | st.text(max_size=8),
        JSON_VALUES,
        max_size=10,
    ),
    st.sampled_from([1, 1, 1, 2, "1", None]),
)
def test_fuzz_random_json_objects_only_ever_raise_protocol_error(obj: dict[str, Any], version: Any) -> None:
    obj["v"] = version
    _decodes_or_protocol_error(orjson.dumps(obj))


@fuzz(1500)
@given(st.data())
def test_fuzz_mutated_valid_requests_only_ever_raise_protocol_error(data: st.DataObject) -> None:
    message = copy.deepcopy(valid_request())
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        if data.draw(st.booleans()):
            message["params"] = dict(message["params"]) if isinstance(message.get("params"), dict) else {}
            message["params"][data.draw(st.sampled_from(PARAM_FIELDS))] = data.draw(JSON_VALUES)
        else:
            message[data.draw(st.sampled_from(list(valid_request())))] = data.draw(JSON_VALUES)
    _decodes_or_protocol_error(orjson.dumps(message))


def test_request_model_is_immutable() -> None:
    message: RequestMessage = decode_request(orjson.dumps(valid_request()))
    with pytest.raises(ValueError):
        message.priority = 5
