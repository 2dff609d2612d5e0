"""vLLM's own OpenAI server app in a Serve replica, with the guide's POST / and the project's checks around it."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from argparse import Namespace
from typing import Any, Awaitable, Callable, cast

from replica import api, vllm_compat
from replica.vllm_compat import vllm_version

logger = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# vLLM's endpoint under the guide's POST / (replica.api shapes its answer into the guide's JSON).
_COMPLETION_PATH = "/v1/completions"
NODE_HEADER = "x-serve-node"


def serve_args(engine_kwargs: dict[str, Any], vllm_cli: list[str] | None = None,
               exit_on_error: bool = True, extra: dict[str, Any] | None = None) -> Namespace:
    """The Namespace `vllm serve` would build: vLLM's own parser over the operator's extra vLLM
    flags, then the settings the project's flags chose (ours win, so --help tells the truth),
    then `extra` (--engine-kwargs: AsyncEngineArgs field names, checked before deploying;
    AsyncEngineArgs.from_cli_args reads every field from the Namespace, flag or not)."""
    parser = vllm_compat.serve_arg_parser(exit_on_error=exit_on_error)
    cli = ["--model", str(engine_kwargs["model"]), *(vllm_cli or [])]
    if exit_on_error:
        args = parser.parse_args(cli)
    else:
        args, unknown = parser.parse_known_args(cli)
        if unknown:
            raise ValueError(f"not a `vllm serve` flag either: {' '.join(unknown)}")
    for name, value in engine_kwargs.items():
        if not hasattr(args, name):
            raise ValueError(f"vLLM {vllm_version()} has no serve argument {name!r}")
        setattr(args, name, value)
    for name, value in (extra or {}).items():
        setattr(args, name, value)
    return args


def serve_help() -> str:
    """`vllm serve --help` of the installed vLLM: its own option groups."""
    return vllm_compat.serve_arg_parser().format_help()


# ---- in-process ASGI calls ------------------------------------------------------------------


_DISCONNECT = {"type": "http.disconnect"}


def replay_body(body: bytes, then: Receive, gone: asyncio.Event) -> Receive:
    """An ASGI receive() that hands over a body already read, then waits on `then` (the client's
    own receive, whose http.disconnect makes vLLM abort the generation) or for `gone` (set when
    the request was cancelled), whichever comes first, and says http.disconnect for `gone`."""
    given = False

    async def receive() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        if gone.is_set():
            return _DISCONNECT
        waits = [asyncio.ensure_future(then()), asyncio.ensure_future(gone.wait())]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                if not waiting.done():
                    waiting.cancel()
        if waits[0] in done:
            return cast(dict, waits[0].result())
        return _DISCONNECT

    return receive


def request_head(scope: Scope) -> tuple[str, dict[str, str]]:
    """A request's path below the route prefix (Serve's root_path) and its headers, lower-cased."""
    path = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path, {k.decode("latin-1").lower(): v.decode("latin-1")
                  for k, v in scope.get("headers") or []}


async def read_body(receive: Receive, limit: int, declared: str | None) -> bytes:
    """The whole request body, refused with 413 above `limit` before reading it where declared."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise api.ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        body += message.get("body", b"")
        if len(body) > limit:
            raise api.ApiError(413, f"request body exceeds the limit of {limit} bytes")
        if not message.get("more_body"):
            return bytes(body)


async def send_json(send: Send, status: int, data: Any,
                    headers: dict[str, str] | None = None) -> None:
    body = json.dumps(data, ensure_ascii=False).encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def call_detached(app: Callable, scope: Scope, body: bytes, receive: Receive,
                        send: Send, running: set[asyncio.Task]) -> None:
    """One ASGI call (its body already read) in a task of its own. Serve cancels a request's
    task when its client goes away, or when the router that called it was cancelled; vLLM
    aborts a generation only through its own disconnect listener (a cancelled
    `with_cancellation` leaves vLLM's handler task running on). So the call outlives that
    cancellation and is told http.disconnect instead; what it sends after is dropped.
    `running` holds the task until it ends."""
    gone = asyncio.Event()

    async def send_until_gone(message: dict) -> None:
        if not gone.is_set():
            await send(message)

    task = asyncio.ensure_future(app(scope, replay_body(body, receive, gone), send_until_gone))
    running.add(task)
    task.add_done_callback(_forget_task(running))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        gone.set()
        raise


def _forget_task(running: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def forget(task: asyncio.Task) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("detached request ended with %r", task.exception())
    return forget


# ---- the replica's app --------------------------------------------------------------------------


def _engine_dead() -> api.ApiError:
    return api.unavailable("the engine of this replica is dead; Serve is replacing it")


class ReplicaApp:
    """The ASGI app a replica serves: vLLM's OpenAI app, plus the guide's POST /, GET /nodes, the
    API key on every path but /health, the body limit, and the node in a response header."""

    def __init__(self, openai_app: Any, *, node_id: str, model_name: str, api_key: str | None,
                 max_body_bytes: int, engine: Any, status: Callable[[], dict[str, Any]],
                 replica_nodes: Callable[[], dict[str, int]]):
        self.openai_app = openai_app
        self.node_id = node_id
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.engine = engine
        self.status = status
        self.replica_nodes = replica_nodes
        self._node_header = [(NODE_HEADER.encode(), node_id.encode())]
        # HTTP requests this replica answered; /nodes and /health (the router's probes) aside.
        self.requests_served = 0
        self._calls: set[asyncio.Task] = set()   # vLLM's app calls in flight (call_detached)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: vLLM's own (its stats logger task)
            return await self.openai_app(scope, receive, send)
        path, headers = request_head(scope)
        probe = path.rstrip("/") == "/health"
        try:
            if not probe:
                self._authorize(headers)
            body = await read_body(receive, self.max_body_bytes, headers.get("content-length"))
            method = scope["method"].upper()
            if path.rstrip("/") == "/nodes" and method == "GET":
                return await send_json(send, 200, await self._nodes(), self._header_dict())
            if not probe:
                self.requests_served += 1
            if path == "/":
                if method != "POST":
                    raise api.ApiError(405, f"{method} is not allowed on /; use POST",
                                       headers={"allow": "POST"})
                return await self._guide_completion(body, scope, receive, send)
            if vllm_compat.engine_errored(self.engine):
                raise _engine_dead()
        except api.ApiError as err:
            return await send_json(send, err.status, err.body(),
                                   {**err.headers, **self._header_dict()})
        # Everything else is vLLM's, untouched: the body already read is handed over first.
        replaced = False

        async def send_with_node(message: dict) -> None:
            nonlocal replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if message["status"] >= 500 and vllm_compat.engine_errored(self.engine):
                    # The engine died under this request: a retryable 503, like every request
                    # after it, rather than vLLM's 500 (Serve is replacing the replica).
                    replaced = True
                    err = _engine_dead()
                    return await send_json(send, err.status, err.body(),
                                           {**err.headers, **self._header_dict()})
                message = {**message, "headers": [*message.get("headers", []),
                                                  *self._node_header]}
            await send(message)

        await call_detached(self.openai_app, scope, body, receive, send_with_node, self._calls)

    @property
    def in_flight(self) -> int:
        """Requests being answered by vLLM's app."""
        return len(self._calls)

    def _header_dict(self) -> dict[str, str]:
        return {NODE_HEADER: self.node_id}

    def _authorize(self, headers: dict[str, str]) -> None:
        if not self.api_key:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode()):
            raise api.ApiError(401, "missing or invalid API key: send "
                                    "'Authorization: Bearer <key>'",
                               headers={"www-authenticate": "Bearer"})

    async def _nodes(self) -> dict[str, Any]:
        return {**self.status(), "requests_served": self.requests_served,
                "replica_nodes": await asyncio.to_thread(self.replica_nodes)}

    async def _guide_completion(self, body: bytes, scope: Scope, receive: Receive,
                                send: Send) -> None:
        """The guide's POST /: vLLM's /v1/completions underneath, called in this task with a
        send that reshapes its answer into the guide's JSON as vLLM sends it (no queue or task
        between vLLM's stream and the client)."""
        request = api.parse_body(body, api.GenerateRequest, self.max_body_bytes)
        payload = json.dumps(api.completion_payload(request, self.model_name)).encode()
        headers = [(k, v) for k, v in scope.get("headers") or []
                   if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())]
        completion_scope = {**scope, "method": "POST", "path": _COMPLETION_PATH,
                            "raw_path": _COMPLETION_PATH.encode(), "query_string": b"",
                            "root_path": "", "headers": headers}
        answer = GuideAnswer(send, self, request.stream)
        await call_detached(self.openai_app, completion_scope, payload, receive, answer.send,
                            self._calls)


class GuideAnswer:
    """The send() vLLM's /v1/completions writes into for a POST /: a 200 stream goes on event by
    event in the guide's shape; anything else is collected and sent whole (the guide's JSON for
    a 200, vLLM's error as it is, a retryable 503 where the engine died under the request)."""

    def __init__(self, send: Send, replica: ReplicaApp, stream: bool):
        self._send = send
        self._replica = replica
        self._shaper = api.GuideStream(replica.node_id) if stream else None
        self._status = 0
        self._body = bytearray()
        self._done = False

    async def send(self, message: dict) -> None:
        if self._done:
            return
        if message["type"] == "http.response.start":
            self._status = message["status"]
            if self._streaming:
                headers = [(k, v) for k, v in message.get("headers") or []
                           if k.lower() != b"content-length"]
                await self._send({"type": "http.response.start", "status": 200,
                                  "headers": headers + self._replica._node_header})
            return
        if message["type"] != "http.response.body":
            return
        more = message.get("more_body", False)
        self._done = not more
        if self._streaming:
            assert self._shaper is not None  # _streaming says so
            out = self._shaper.feed(message.get("body", b""))
            if not more:
                out += self._shaper.close()
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self._body += message.get("body", b"")
        if not more:
            await self._send_whole()

    @property
    def _streaming(self) -> bool:
        return self._shaper is not None and self._status == 200

    async def _send_whole(self) -> None:
        replica = self._replica
        if self._status >= 500 and vllm_compat.engine_errored(replica.engine):
            err = _engine_dead()
            return await send_json(self._send, err.status, err.body(),
                                   {**err.headers, **replica._header_dict()})
        data = json.loads(bytes(self._body) or b"{}")
        if self._status == 200:
            data = api.guide_body(data, replica.node_id)
        await send_json(self._send, self._status, data, replica._header_dict())
