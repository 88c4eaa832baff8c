"""The gateway's bodies without processes: the per-token SSE fast path equals the pydantic models byte for
byte, request parsing names the bad field, and the error table. Owned by the tests; pure functions only."""

from __future__ import annotations

import json

import pytest

from producer_sdk.errors import QueueFullError, RejectedError, WorkerFailureError
from worker.gateway.errors import ApiError, api_error_for
from worker.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, parse_body
from worker.gateway.relay import Job, JobSpec

TEXTS = ["hello", "", " ", "é漢字🙂", 'quote " back \\ slash', "ctl \x00\x01\x1f\x7f tab\t nl\n cr\r", "</script>",
         "\u2028\u2029", "a" * 300]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_content_chunk_fast_path_equals_the_models(kind: str) -> None:
    spec = JobSpec(kind=kind, model="m-1.b", prompts=[{"prompt": "x"}], n=1, sampling={}, seed=None,  # type: ignore[arg-type]
                   request_id=None, include_usage=False, retry_after_s=1)
    job = Job(spec, [], id='chatcmpl-"odd\\id', created=1733333333)
    for index in (0, 7, 15):
        for text in TEXTS:
            fast = job.content_chunk(index, text)
            assert fast == job._text_chunk(index, text, None)
            assert json.loads(fast.removeprefix(b"data: ").removesuffix(b"\n\n"))["choices"][0]["index"] == index


def test_parse_body_names_the_field_and_ignores_unknown_ones() -> None:
    ok = parse_body(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                            "tools": [], "stop": "x", "max_completion_tokens": 3, "max_tokens": 9})
    assert ok.stop_list() == ["x"] and ok.requested_max_tokens() == 3
    with pytest.raises(ApiError) as e:
        parse_body(CompletionRequest, {"model": "m", "prompt": "p", "top_p": 0})
    assert (e.value.status, e.value.param) == (400, "top_p")
    with pytest.raises(ApiError) as e:
        parse_body(CompletionRequest, {"model": "m", "prompt": [1, "a"]})
    assert e.value.param == "prompt"
    assert parse_body(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]]}).prompts() == [
        {"prompt_ids": [1, 2]}, {"prompt_ids": [3]}]


def test_error_table() -> None:
    e = api_error_for(QueueFullError("m", 5, 5), retry_after_s=3)
    assert (e.status, e.code, e.headers["Retry-After"]) == (429, "rate_limit_exceeded", "3")
    e = api_error_for(RejectedError("prompt_too_long", "too long", {"needed_tokens": 5000, "limit_tokens": 4096}),
                      prompt_param="prompt")
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "prompt")
    assert "needed_tokens=5000" in e.message and e.headers["x-should-retry"] == "false"
    assert api_error_for(WorkerFailureError("dead_letter", "x")).status == 500
    assert api_error_for(RejectedError("some_future_code", "x")).status == 500
