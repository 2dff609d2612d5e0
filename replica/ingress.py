"""Serve deployments: a replica serving its app over HTTP (LLMDeployment), a router's backend, the router."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Any

from ray import serve

from replica import api, vllm_app
from replica.api import RawRequest
from replica.config import ServeConfig
from replica.server import ROUTER_DEPLOYMENT, LLMServer

logger = logging.getLogger("ray.serve")

# Serve's health check calls LLMServer.check_health; a dead engine gets its replica replaced.
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# On stop or downscale, a replica gets this long to finish the requests it holds.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 120.0

# Every deployment that holds an engine: health-checked through LLMServer.check_health, and
# drained on stop/downscale.
ENGINE_REPLICA_OPTIONS = {"health_check_period_s": HEALTH_CHECK_PERIOD_S,
                          "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
                          "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S}


@serve.deployment(name="LLMDeployment", **ENGINE_REPLICA_OPTIONS)
@serve.ingress()
class LLMDeployment(LLMServer):
    """One vLLM engine answering HTTP itself (single-gpu, force-multi, product): the app is
    vLLM's own, built once the engine runs, so Serve binds it late."""

    async def __serve_build_asgi_app__(self):
        return self.replica_app


# The backends of ray-placement-group.py: no HTTP of their own; the router calls `call`.
LLMBackend = serve.deployment(LLMServer, name="LLMBackend", **ENGINE_REPLICA_OPTIONS)

# How often the router probes each backend, and how long a probe may take before the backend
# counts as down. A down backend gets no new requests until a probe succeeds again.
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 5.0


async def _read_raw(scope: dict, receive, max_body_bytes: int) -> RawRequest:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1")
               for k, v in scope.get("headers") or []}
    path = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    body = await vllm_app.read_body(receive, max_body_bytes, headers.get("content-length"))
    return RawRequest(method=scope["method"], path=path, headers=headers, body=body)


async def _send_answer(send, head: dict[str, Any], chunks: Any) -> None:
    """A backend's answer to the client: its status and headers, then its body chunks."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"].items()
               if k.lower() != "content-length"]
    await send({"type": "http.response.start", "status": head["status"], "headers": headers})
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class RouterApp:
    """The router's ASGI app: every request goes whole to one backend's `call`, round-robin over
    the backends that are up; one that fails before answering is skipped for the next; a client
    that leaves cancels the backend's call."""

    def __init__(self, router: "RoundRobinRouter"):
        self.router = router

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        router = self.router
        router.start_probing()
        try:
            raw = await _read_raw(scope, receive, router.serve_config.max_body_bytes)
        except api.ApiError as err:
            return await vllm_app.send_json(send, err.status, err.body(), err.headers)
        last_error: Exception | None = None
        for index in router.order():
            call = router.streams[index].call.remote(raw)
            try:
                head = await call.__anext__()
            except asyncio.CancelledError:
                call.cancel()  # the client left: Serve does not cancel a handle call for us
                raise
            except Exception as exc:  # backend died or unreachable: nothing sent yet, try next
                last_error = exc
                router.up[index] = False
                logger.warning("backend %d failed (%s); trying the next", index,
                               type(exc).__name__)
                continue
            try:
                return await _send_answer(send, head, call)
            except asyncio.CancelledError:
                call.cancel()
                raise
        err = api.unavailable(f"no backend could take the request ({type(last_error).__name__})")
        await vllm_app.send_json(send, err.status, err.body(), err.headers)


def handle_transport() -> dict[str, bool]:
    """The transport of the router's calls to its backends: the one this replica's Serve settings
    pick. A handle bound in the driver carries the driver's default, which is Ray's actor calls
    unless the driver itself was started with Serve's throughput settings; with them on the
    cluster (--ingress haproxy), Serve's gRPC between replicas carries a stream's chunks at a
    fraction of an actor call's cost per chunk (bench/handle_stream_rate.py)."""
    try:  # Serve's own reading of its settings (an internal module)
        from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT as grpc_on
    except ImportError:  # a Ray that moved it: the documented variables, read the same way
        optimized = os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0") == "1"
        grpc_on = os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT",
                                 "1" if optimized else "0") == "1"
    return {"_by_reference": not grpc_on}


@serve.deployment(name=ROUTER_DEPLOYMENT, max_ongoing_requests=4096, num_replicas=1,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class RoundRobinRouter:
    """Spreads requests round-robin over backend deployments, skipping ones that are down."""

    def __init__(self, serve_config: ServeConfig, *backends: Any):
        self.serve_config = serve_config
        transport = handle_transport()
        self.backends = [b.options(**transport) for b in backends]
        self.streams = [b.options(stream=True, **transport) for b in backends]
        self.up = [True] * len(backends)
        self._turn = itertools.count()
        self._prober: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self):
        return RouterApp(self)

    def start_probing(self) -> None:
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

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

    def order(self) -> list[int]:
        """Backends to try for the next request: round-robin over the ones up, then the rest."""
        count = len(self.backends)
        start = next(self._turn)
        rotation = [(start + k) % count for k in range(count)]
        return [i for i in rotation if self.up[i]] + [i for i in rotation if not self.up[i]]

    async def healthy(self) -> bool:
        return any(self.up)
