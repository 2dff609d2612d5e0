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


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_sse_delta_encoder_gives_the_same_bytes(kind):
    ctx = api.ResponseContext(request_id="cmpl-1", model="m\"odel", node="n\u2028", created=7)
    encoder = api.SSEDeltaEncoder(ctx, kind)
    for text in ["", " word", "你好", 'q"b\\s\n\t\x00\x1f', "\u2028😀", "\x00slot\x00"]:
        chunk = api.completion_chunk(ctx, text, None) if kind == "completion" \
            else api.chat_chunk(ctx, {"content": text}, None)
        assert encoder.frame(text) == api.sse(chunk)


def _stream_events(kind: str, usage_mode: str, deltas: list[str]) -> list[dict | str]:
    """Drive LLMServer._stream with fake engine outputs; return the SSE events it sent."""
    import asyncio
    from types import SimpleNamespace

    from common.config import ServeConfig
    from common.server import LLMServer

    server = object.__new__(LLMServer)
    server.serve_config = ServeConfig()
    server.counters = {"running": 0, "finished": 0, "aborted": 0, "failed": 0}

    async def outputs():
        for i, text in enumerate(deltas):
            done = i == len(deltas) - 1
            yield SimpleNamespace(outputs=[SimpleNamespace(
                text=text, token_ids=[i], finish_reason="length" if done else None)])

    async def run() -> bytes:
        ctx = api.ResponseContext(request_id="cmpl-1", model="m", node="n", created=1)
        return b"".join([chunk async for chunk in server._stream(ctx, outputs(), 3, kind,
                                                                  usage_mode)])

    body = asyncio.run(run())
    assert body.endswith(b"\n\n") and server.counters["finished"] == 1
    events = []
    for frame in body.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        events.append(frame[6:].decode() if frame == b"data: [DONE]" else json.loads(frame[6:]))
    return events


def test_stream_events_completion_inline_usage():
    events = _stream_events("completion", "inline", ["a", "b", "c"])
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b", "c"]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert "usage" not in events[1] and events[2]["usage"]["completion_tokens"] == 3
    assert events[-1] == "[DONE]"


def test_stream_events_chat_separate_usage_and_one_token():
    events = _stream_events("chat", "separate", ["x", "y"])
    assert events[0]["choices"][0]["delta"] == {"content": "x", "role": "assistant"}
    assert events[1]["choices"][0]["delta"] == {"content": "y"}
    assert events[1]["choices"][0]["finish_reason"] == "length"
    assert events[2]["choices"] == [] and events[2]["usage"]["total_tokens"] == 5
    assert events[3] == "[DONE]"
    events = _stream_events("chat", "none", ["only"])
    assert events[0]["choices"][0]["delta"] == {"content": "only", "role": "assistant"}
    assert events[0]["choices"][0]["finish_reason"] == "length" and events[1] == "[DONE]"
