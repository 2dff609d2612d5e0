"""The placement-group router's hop to its backends: each backend's app on an HTTP server of its own, and the router's client for it."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Callable

logger = logging.getLogger("ray.serve")

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the client library sets itself.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade", "host", "content-length"})
CONNECT_TIMEOUT_S = 10.0
# The router closes an idle connection well before the backend would: a connection the backend
# closed just as the router reused it would fail a request that never reached the backend.
CLIENT_KEEPALIVE_S = 30.0
SERVER_KEEPALIVE_S = 90.0


class BackendUnreachable(Exception):
    """The backend could not be reached, or closed the connection before answering: nothing
    reached the client yet, so the router may try another backend."""


class BackendHttpServer:
    """A backend's app on an HTTP server bound to its node's address (the router may run on
    another node). Port 0 takes any free port; the URL says which."""

    def __init__(self, app: Callable, host: str, port: int):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._server: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"the backend's HTTP server cannot bind {self.host}:{self.port} "
                               f"({exc}); pick another --backend-port") from None
        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_config=None,
                                http="auto", loop="none",
                                timeout_keep_alive=int(SERVER_KEEPALIVE_S))
        self._server = uvicorn.Server(config)
        # Serve owns the process's signals; uvicorn would otherwise take SIGINT/SIGTERM over
        # while it runs on the main thread.
        self._server.capture_signals = contextlib.nullcontext
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why the server stopped
                raise RuntimeError("the backend's HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{host}:{bound_port}"
        logger.info("backend HTTP server on %s", self.url)
        return self.url

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking connections, then wait (at most timeout_s) for the requests in flight."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            logger.warning("backend HTTP server: requests still running after %.0f s",
                           timeout_s)


class BackendClient:
    """Forwards a request to a backend's server and its answer, streamed, to the router's
    client. Closing (the router's client left: the request task is cancelled) closes the
    connection to the backend, which aborts the generation there."""

    def __init__(self) -> None:
        self._session: Any = None

    def session(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                auto_decompress=False)
        return self._session

    async def forward(self, url: str, scope: dict, body: bytes, send: Callable) -> None:
        import aiohttp

        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in scope.get("headers") or []
                   if k.decode("latin-1").lower() not in _NOT_FORWARDED]
        target = url + scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            response = await self.session().request(
                scope["method"], target, data=body, headers=headers, allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise BackendUnreachable(f"{type(exc).__name__}: {exc}") from None
        async with response:
            out_headers = [(k, v) for k, v in response.raw_headers
                           if k.decode("latin-1").lower() not in _NOT_FORWARDED]
            await send({"type": "http.response.start", "status": response.status,
                        "headers": out_headers})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    async def reachable(self, url: str, timeout_s: float) -> str | None:
        """None when the backend's server answers GET /health over HTTP within timeout_s (any
        status: the engine's own state comes from the backend through Serve), else why not.
        The probe takes the path the traffic takes, so a port a firewall drops counts as down."""
        import aiohttp

        try:
            async with self.session().get(url + "/health", allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
                await answer.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"GET {url}/health: {type(exc).__name__}: {exc}".rstrip(": ")
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
