"""vLLM's own OpenAI server app in a Serve replica, with the guide's POST / and the project's checks around it."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import types
from argparse import Namespace
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from replica import api
from replica.api import RawRequest

logger = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# vLLM's endpoint under the guide's POST / (replica.api shapes its answer into the guide's JSON).
_COMPLETION_PATH = "/v1/completions"
NODE_HEADER = "x-serve-node"


def vllm_entrypoints() -> tuple[Callable, Callable, Callable]:
    """(make_arg_parser, build_app, init_app_state) of the installed vLLM: 0.27 moved them from
    vllm.entrypoints.openai to vllm.entrypoints.launchers (0.32 keeps deprecated aliases)."""
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.api_server import build_app, init_app_state
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser, build_app, init_app_state


def serve_args(engine_kwargs: dict[str, Any], vllm_cli: list[str] | None = None,
               exit_on_error: bool = True, extra: dict[str, Any] | None = None) -> Namespace:
    """The Namespace `vllm serve` would build: vLLM's own parser over the operator's extra vLLM
    flags, then the settings the project's flags chose (ours win, so --help tells the truth),
    then `extra` (--engine-kwargs: AsyncEngineArgs field names, checked before deploying;
    AsyncEngineArgs.from_cli_args reads every field from the Namespace, flag or not)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser, _, _ = vllm_entrypoints()
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve",
                                                    exit_on_error=exit_on_error))
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
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser, _, _ = vllm_entrypoints()
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).format_help()


def vllm_version() -> str:
    try:
        from vllm import __version__
        return str(__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


async def build_openai_app(engine_client: Any, args: Namespace):
    """vLLM's FastAPI app over an engine this process already runs, as `vllm serve` builds it."""
    _, build_app, init_app_state = vllm_entrypoints()
    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    # vLLM's engine-error handler tells the HTTP server it runs under to exit; here Serve owns
    # the server (and replaces the replica through check_health), so a stand-in takes the call.
    app.state.server = types.SimpleNamespace(should_exit=False)
    return app


# ---- in-process ASGI calls ------------------------------------------------------------------


@dataclass
class AsgiResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: AsyncIterator[bytes]

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks])


def replay_body(body: bytes, then: Receive | None) -> Receive:
    """An ASGI receive() that hands over a body already read, then waits on `then` (the client's
    own receive, whose http.disconnect makes vLLM abort the generation), or for ever."""
    given = False

    async def receive() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        if then is not None:
            return await then()
        await asyncio.Event().wait()  # never: the caller ends the task by closing the stream
        return {"type": "http.disconnect"}

    return receive


async def asgi_call(app: Callable, method: str, path: str, headers: list[tuple[bytes, bytes]],
                    body: bytes, disconnected: Receive | None = None,
                    client: tuple[str, int] | None = None) -> AsgiResponse:
    """Run one HTTP request through an ASGI app in this process. After the body, the app's
    receive() waits on `disconnected` (the outer client's receive), so a client that goes away
    still aborts the generation; closing `chunks` early cancels the app's task."""
    messages: asyncio.Queue = asyncio.Queue()
    receive = replay_body(body, disconnected)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": client or ("127.0.0.1", 0),
             "server": ("127.0.0.1", 0), "state": {}}
    task = asyncio.ensure_future(app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    start = await messages.get()
    if start is None:
        task.result()  # raises what the app raised
        raise RuntimeError(f"the app sent no response to {method} {path}")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while True:
                message = await messages.get()
                if message is None:
                    break
                if message.get("type") == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
            await task
        finally:
            if not task.done():
                task.cancel()

    return AsgiResponse(status=start["status"], headers=list(start.get("headers") or []),
                        chunks=chunks())


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


async def send_stream(send: Send, response: AsgiResponse, extra_headers: list,
                      chunks: AsyncIterator[bytes] | None = None) -> None:
    headers = [(k, v) for k, v in response.headers if k.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": response.status,
                "headers": headers + extra_headers})
    async for chunk in chunks or response.chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


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
        self.requests_served = 0   # HTTP requests this replica answered, GET /nodes aside

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: vLLM's own (its stats logger task)
            return await self.openai_app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        try:
            if path.rstrip("/") != "/health":
                self._authorize(headers)
            body = await read_body(receive, self.max_body_bytes, headers.get("content-length"))
            method = scope["method"].upper()
            if path.rstrip("/") == "/nodes" and method == "GET":
                return await send_json(send, 200, await self._nodes(), self._header_dict())
            self.requests_served += 1
            if path == "/":
                if method != "POST":
                    raise api.ApiError(405, f"{method} is not allowed on /; use POST",
                                       headers={"allow": "POST"})
                return await self._guide_completion(body, scope, receive, send)
            if self.engine.errored:
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
                if message["status"] >= 500 and self.engine.errored:
                    # The engine died under this request: a retryable 503, like every request
                    # after it, rather than vLLM's 500 (Serve is replacing the replica).
                    replaced = True
                    err = _engine_dead()
                    return await send_json(send, err.status, err.body(),
                                           {**err.headers, **self._header_dict()})
                message = {**message, "headers": [*message.get("headers", []),
                                                  *self._node_header]}
            await send(message)

        await self.openai_app(scope, replay_body(body, receive), send_with_node)

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
        """The guide's POST /: vLLM's /v1/completions underneath, the guide's JSON on top."""
        request = api.parse_body(body, api.GenerateRequest, self.max_body_bytes)
        payload = api.completion_payload(request, self.model_name)
        headers = [(k, v) for k, v in scope.get("headers") or []
                   if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json")]
        response = await asgi_call(self.openai_app, "POST", _COMPLETION_PATH, headers,
                                   json.dumps(payload).encode(), receive, scope.get("client"))
        if response.status >= 500 and self.engine.errored:
            await response.read()
            err = _engine_dead()
            return await send_json(send, err.status, err.body(),
                                   {**err.headers, **self._header_dict()})
        if response.status != 200 or not request.stream:
            data = json.loads(await response.read() or b"{}")
            if response.status == 200:
                data = api.guide_body(data, self.node_id)
            return await send_json(send, response.status, data, self._header_dict())
        await send_stream(send, response, self._node_header,
                          api.guide_stream(response.chunks, self.node_id))


async def call_through(app: Callable, raw: RawRequest) -> AsyncIterator[Any]:
    """A RawRequest through the replica's app, for routers calling over a DeploymentHandle:
    first {"status", "headers"}, then the body in byte chunks."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in raw.headers.items()]
    headers = [(k, v) for k, v in headers if k != b"content-length"]
    headers.append((b"content-length", str(len(raw.body)).encode()))
    response = await asgi_call(app, raw.method, raw.path, headers, raw.body)
    yield {"status": response.status,
           "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}}
    async for chunk in response.chunks:
        yield chunk
