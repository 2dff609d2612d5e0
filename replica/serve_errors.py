"""Serve's own plain-text HTTP errors (backpressure 503, ...) re-sent in vLLM's JSON error shape."""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from replica import api

Message = dict[str, Any]


class JsonServeErrors:
    """Pure ASGI middleware: an error response whose body is plain text (Serve's own, e.g.
    'Request dropped due to backpressure' with 503 + Retry-After) is re-sent as
    {"error": {"message", "type", "param", "code"}}, its other headers kept. Responses of the
    application (JSON, SSE) pass untouched, chunk by chunk."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: Message | None = None
        text = bytearray()

        async def send_json_errors(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and _is_plain_error(message):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            text.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            error = api.ApiError(held["status"], text.decode("utf-8", "replace").strip() or
                                 "error")
            body = json.dumps(error.body(), ensure_ascii=False).encode()
            headers = [(k, v) for k, v in held.get("headers", [])
                       if k.lower() not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_json_errors)


def _is_plain_error(start: Message) -> bool:
    if start["status"] < 400:
        return False
    content_type = b""
    for key, value in start.get("headers", []):
        if key.lower() == b"content-type":
            content_type = value.lower()
    return not content_type or content_type.startswith(b"text/plain")


def json_error_middlewares() -> list:
    """What Serve's HTTP server in a replica wraps its app with: RAY_SERVE_HTTP_PROXY_CALLBACK_
    IMPORT_PATH names this function in the replicas' environment (replica.config)."""
    from starlette.middleware import Middleware

    return [Middleware(JsonServeErrors)]
