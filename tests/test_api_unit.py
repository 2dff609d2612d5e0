"""Unit tests of the guide's POST / on vLLM's completions: validation and shaping (no engine, no Ray)."""
from __future__ import annotations

import json

import pytest

from replica import api
from replica.api import ApiError


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


def test_errors_have_vllms_error_response_shape():
    body = ApiError(413, "too big").body()
    assert body == {"error": {"message": "too big", "type": "RequestEntityTooLargeError",
                              "param": None, "code": 413}}
    assert api.unavailable("later").headers == {"retry-after": str(api.RETRY_AFTER_S)}


def test_payload_sends_only_what_the_client_set():
    req = parse(b'{"prompt": "hi", "temperature": 0, "stream": true}')
    payload = api.completion_payload(req, "DeepSeek-R1")
    # temperature 0 is a choice (greedy), not "unset"; the rest stays vLLM's (generation_config).
    assert payload == {"model": "DeepSeek-R1", "prompt": "hi", "max_tokens": 256, "stream": True,
                       "temperature": 0, "stream_options": {"include_usage": True}}


VLLM_COMPLETION = {
    "id": "cmpl-abc", "object": "text_completion", "created": 5, "model": "DeepSeek-R1",
    "system_fingerprint": None, "kv_transfer_params": None,
    "choices": [{"index": 0, "text": "生成的文本", "logprobs": None, "finish_reason": "stop",
                 "stop_reason": None, "prompt_logprobs": None}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110,
              "prompt_tokens_details": None}}


def test_guide_body_is_the_guides_json_exactly():
    body = api.guide_body(VLLM_COMPLETION, "node-1")
    assert list(body) == ["id", "object", "created", "model", "node", "choices", "usage"]
    assert body["choices"] == [{"text": "生成的文本", "index": 0, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
    assert body["node"] == "node-1" and body["id"] == "cmpl-abc"


def _vllm_chunk(text: str | None, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None,
                                        "finish_reason": finish, "stop_reason": None}]
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
             "choices": choices, "usage": usage}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.mark.parametrize("split", [1, 7, 10_000], ids=["bytewise", "odd", "whole"])
def test_guide_stream_reshapes_vllms_chunks_and_moves_usage_into_the_last(split):
    raw = (_vllm_chunk("a") + b": keep-alive\n\n" + _vllm_chunk("b") +
           _vllm_chunk("c", "length") +
           _vllm_chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 3,
                                    "total_tokens": 6}) + b"data: [DONE]\n\n")

    shaper = api.GuideStream("n1")
    out = b"".join(shaper.feed(raw[start:start + split]) for start in range(0, len(raw), split))
    frames = (out + shaper.close()).split(b"\n\n")[:-1]
    events = [f[6:].decode() if f == b"data: [DONE]" else json.loads(f[6:]) for f in frames]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b", "c"]
    assert all(set(e) <= {"id", "object", "created", "model", "node", "choices", "usage"}
               and e["node"] == "n1" for e in events[:-1])
    assert "usage" not in events[1]
    assert events[2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert events[2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
