"""Serve ingress deployments: the HTTP front of a replica (LLMDeployment) and of the router."""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from common import api
from common.api import ApiError, RawRequest, Result
from common.config import ServeConfig
from common.server import ROUTER_DEPLOYMENT, LLMServer

logger = logging.getLogger("ray.serve")

# Serve's health check calls LLMServer.check_health; a dead engine gets its replica replaced.
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# On stop or downscale, a replica gets this long to finish the requests it holds.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 120.0

HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def new_app() -> FastAPI:
    # One catch-all route: the API's own router answers 404/405 in the API's error format.
    return FastAPI(title="Ray Serve + vLLM", docs_url=None, redoc_url=None, openapi_url=None)


async def read_request(request: Request, max_body_bytes: int) -> RawRequest:
    """Starlette request -> RawRequest, refusing oversize bodies before reading them."""
    path = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    headers = {k.lower(): v for k, v in request.headers.items()}
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
    return RawRequest(method=request.method, path=path, headers=headers, body=bytes(body))


def to_response(result: Result) -> Response:
    if result.stream is not None:
        return StreamingResponse(result.stream, status_code=result.status, headers=result.headers)
    return Response(content=result.body, status_code=result.status, headers=result.headers)


replica_app = new_app()


# Every deployment that holds an engine: health-checked through LLMServer.check_health, and
# drained on stop/downscale.
ENGINE_REPLICA_OPTIONS = {"health_check_period_s": HEALTH_CHECK_PERIOD_S,
                          "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
                          "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S}


@serve.deployment(name="LLMServer", **ENGINE_REPLICA_OPTIONS)
@serve.ingress(replica_app)
class LLMDeployment(LLMServer):
    """One vLLM engine answering HTTP directly (single-gpu, force-multi, product)."""

    @replica_app.api_route("/{path:path}", methods=HTTP_METHODS, include_in_schema=False)
    async def entry(self, request: Request) -> Response:
        try:
            raw = await read_request(request, self.serve_config.max_body_bytes)
        except ApiError as err:
            return to_response(api.error_result(err))
        return to_response(await self.respond(raw))


# The backends of ray-placement-group.py: no HTTP of their own; the router calls `call`.
LLMBackend = serve.deployment(LLMServer, name="LLMBackend", **ENGINE_REPLICA_OPTIONS)

# Defined above the router: Serve pickles an ingress class when it is decorated, with the
# module globals that exist at that moment.
async def _relay(head: dict, gen) -> Response:
    """Turn a backend's (head, chunk, ...) stream into one HTTP response."""
    headers = head["headers"]
    if headers.get("content-type", "").startswith("text/event-stream"):
        async def chunks():
            async for chunk in gen:
                yield chunk
        return StreamingResponse(chunks(), status_code=head["status"], headers=headers)
    body = b"".join([chunk async for chunk in gen])
    return Response(content=body, status_code=head["status"], headers=headers)


router_app = new_app()

# How often the router probes each backend, and how long a probe may take before the backend
# counts as down. A down backend gets no new requests until a probe succeeds again.
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 5.0


@serve.deployment(name=ROUTER_DEPLOYMENT, max_ongoing_requests=4096, num_replicas=1,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(router_app)
class RoundRobinRouter:
    """Spreads requests round-robin over backend deployments, skipping ones that are down."""

    def __init__(self, serve_config: ServeConfig, *backends: Any):
        self.serve_config = serve_config
        self.backends = list(backends)
        self.streams = [b.options(stream=True) for b in backends]
        self.up = [True] * len(backends)
        self._turn = itertools.count()
        self._prober: asyncio.Task | None = None

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in range(len(self.backends))))
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _probe(self, index: int) -> None:
        try:
            alive = await asyncio.wait_for(self.backends[index].healthy.remote(),
                                           timeout=PROBE_TIMEOUT_S)
        except Exception:  # timeout, no replica, replica died: all mean "down" to the router
            alive = False
        if alive != self.up[index]:
            logger.warning("backend %d is now %s", index, "up" if alive else "DOWN")
        self.up[index] = alive

    def _order(self) -> list[int]:
        """Backends to try for the next request: round-robin over the ones up, then the rest."""
        count = len(self.backends)
        start = next(self._turn)
        rotation = [(start + k) % count for k in range(count)]
        return [i for i in rotation if self.up[i]] + [i for i in rotation if not self.up[i]]

    async def healthy(self) -> bool:
        return any(self.up)

    @router_app.api_route("/{path:path}", methods=HTTP_METHODS, include_in_schema=False)
    async def entry(self, request: Request) -> Response:
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())
        try:
            raw = await read_request(request, self.serve_config.max_body_bytes)
        except ApiError as err:
            return to_response(api.error_result(err))
        last_error: Exception | None = None
        for index in self._order():
            gen = self.streams[index].call.remote(raw)
            try:
                head = await gen.__anext__()
            except Exception as exc:  # backend died or unreachable: nothing sent yet, try next
                last_error = exc
                self.up[index] = False
                logger.warning("backend %d failed (%s); trying the next", index,
                               type(exc).__name__)
                continue
            return await _relay(head, gen)
        return to_response(api.error_result(api.unavailable(
            f"no backend could take the request ({type(last_error).__name__})")))
