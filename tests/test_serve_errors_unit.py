"""The JSON-errors middleware Serve wraps a replica's HTTP server with (replica/serve_errors.py)."""
from __future__ import annotations

import asyncio
import json

from replica.serve_errors import JsonServeErrors, json_error_middlewares


def _run(app) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(JsonServeErrors(app)({"type": "http"}, receive, send))
    return sent


def test_serves_plain_text_error_becomes_vllms_json_shape_with_its_headers():
    async def backpressure(scope, receive, send):  # what Serve's replica sends when full
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", b"34"), (b"retry-after", b"5")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to ",
                    "more_body": True})
        await send({"type": "http.response.body", "body": b"backpressure"})

    start, body = _run(backpressure)
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"5"
    assert headers[b"content-type"] == b"application/json"
    error = json.loads(body["body"])["error"]
    assert error == {"message": "Request dropped due to backpressure",
                     "type": "ServiceUnavailableError", "param": None, "code": 503}
    assert int(headers[b"content-length"]) == len(body["body"])


def test_json_errors_and_streams_pass_untouched():
    messages = [{"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", b"text/event-stream")]},
                {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
                {"type": "http.response.body", "body": b""}]

    async def stream(scope, receive, send):
        for message in messages:
            await send(message)

    assert _run(stream) == messages

    error = [{"type": "http.response.start", "status": 400,
              "headers": [(b"content-type", b"application/json")]},
             {"type": "http.response.body", "body": b'{"error": {}}'}]

    async def bad_request(scope, receive, send):
        for message in error:
            await send(message)

    assert _run(bad_request) == error


def test_callback_returns_starlette_middleware():
    (middleware,) = json_error_middlewares()
    assert middleware.cls is JsonServeErrors
