"""Unit tests of request validation and response shaping (no engine, no Ray)."""
from __future__ import annotations

import json

import pytest

from common import api
from common.api import ApiError


def parse(body: bytes, model=api.GenerateRequest, limit: int = 1 << 20):
    return api.parse_body(body, model, limit)


def test_guide_request_parses_with_defaults():
    req = parse(b'{"prompt": "hi", "max_tokens": 500}')
    assert req.prompt == "hi" and req.max_tokens == 500 and req.stream is False


@pytest.mark.parametrize("body,status,words", [
    (b"", 400, "empty"), (b"{", 400, "invalid JSON"), (b"[1]", 400, "JSON object"),
    (b'{"prompt": "\xff"}', 400, "UTF-8"), (b'{"max_tokens": 1}', 400, "prompt: field required"),
    (b'{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
    (b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    (b'{"prompt": "x", "stop": ["a", ""]}', 400, "stop"),
    (b'{"prompt": "x", "extra": 1}', 400, "extra: unknown field"),
    (b'{"prompt": "' + b"a" * 2048 + b'"}', 413, "limit"),
])
def test_bad_bodies_name_the_problem(body, status, words):
    with pytest.raises(ApiError) as exc:
        parse(body, limit=1024)
    assert exc.value.status == status and words in exc.value.message


def test_openai_requests_ignore_unknown_fields_and_take_one_prompt():
    req = parse(b'{"model": "m", "prompt": ["one"], "user": "u"}', api.CompletionRequest)
    assert req.prompt == "one" and req.max_tokens == 16
    with pytest.raises(ApiError):
        parse(b'{"prompt": ["a", "b"]}', api.CompletionRequest)
    with pytest.raises(ApiError):
        parse(b'{"prompt": "a", "n": 2}', api.CompletionRequest)


def test_completion_body_is_the_guides_format():
    ctx = api.ResponseContext(request_id="cmpl-1", model="DeepSeek-R1", node="n1", created=5)
    body = api.completion_body(ctx, api.Generation("text", "stop", 10, 100))
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 5,
                    "model": "DeepSeek-R1", "node": "n1",
                    "choices": [{"text": "text", "index": 0, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 100,
                              "total_tokens": 110}}


def test_sse_framing_and_chat_shapes():
    ctx = api.ResponseContext(request_id="chatcmpl-1", model="m", node="n", created=1)
    frame = api.sse(api.chat_chunk(ctx, {"content": "你"}, None))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:])["choices"][0]["delta"]["content"] == "你"
    assert api.SSE_DONE == b"data: [DONE]\n\n"
    usage = api.usage_chunk(ctx, "chat.completion.chunk", api.usage(1, 2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_request_ids_keep_a_clean_client_id_only():
    assert api.new_request_id("abc-123") == "cmpl-abc-123"
    assert api.new_request_id("cmpl-x") == "cmpl-x"
    assert api.new_request_id("bad id\n").startswith("cmpl-") and "\n" not in \
        api.new_request_id("bad id\n")
