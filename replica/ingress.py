"""Serve deployments: a replica serving its app over HTTP (LLMDeployment), a router's backend, the router."""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import random
from typing import Any

from ray import serve

from replica import api, prefix_routing, vllm_app
from replica.backend_http import BackendClient, BackendHttpServer, BackendUnreachable
from replica.config import SESSION_HEADER, ServeConfig
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


class BackendServer(LLMServer):
    """A backend of ray-placement-group.py: the replica's app on an HTTP server of its own, on
    its node's address. The router forwards requests there; through Serve it only asks for the
    server's URL. A request then costs the backend what it costs a replica answering HTTP itself,
    where a Serve handle call would add a message per streamed chunk (bench/router_hop_rate.py)."""

    async def __init__(self, engine_config, serve_config: ServeConfig, port: int = 0):
        import ray

        await super().__init__(engine_config, serve_config)
        self.http = BackendHttpServer(self.replica_app, ray.util.get_node_ip_address(), port)
        await self.http.start()

    async def endpoint(self) -> str | None:
        """The URL of this backend's server; None while its engine or server is down."""
        return self.http.url if self.http.running and not self.engine.errored else None

    async def check_health(self) -> None:
        await super().check_health()
        if not self.http.running:
            raise RuntimeError("the backend's HTTP server stopped")

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config of a backend records what the script deployed it with (version,
        node pin; common/backend_stages.py) for the script's next run; the replica needs none
        of it, and a change of it alone restarts nothing."""

    def __del__(self):
        # Serve counts no requests in flight here (they come over the backend's own server):
        # finish them before the engine goes. Serve awaits what its destructor call returns;
        # a plain finalizer call (the server stopped already) ends the engine at once.
        http = getattr(self, "http", None)
        if http is None or not http.running:
            return super().__del__()
        return self._drain_then_stop(http)

    async def _drain_then_stop(self, http: BackendHttpServer) -> None:
        await http.drain(GRACEFUL_SHUTDOWN_TIMEOUT_S)
        super().__del__()


LLMBackend = serve.deployment(BackendServer, name="LLMBackend", **ENGINE_REPLICA_OPTIONS)

# How often the router asks each backend for its URL, and how long that may take before the
# backend counts as down. A down backend gets no new requests until it answers again.
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 5.0


class RouterApp:
    """The router's ASGI app: every request goes whole to one backend's server, round-robin over
    the backends that are up; one that cannot be reached is skipped for the next; a client that
    leaves closes the connection to the backend, which aborts the generation there."""

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
        await router.probed()
        path, headers = vllm_app.request_head(scope)
        try:
            body = await vllm_app.read_body(receive, router.serve_config.max_body_bytes,
                                            headers.get("content-length"))
        except api.ApiError as err:
            return await vllm_app.send_json(send, err.status, err.body(), err.headers)
        scope = {**scope, "path": path}
        last_error: Exception | None = None
        for index in router.order(headers.get(SESSION_HEADER), body):
            url = router.urls[index]
            if url is None:
                continue
            router.in_flight[index] += 1
            try:
                return await router.client.forward(url, scope, body, send)
            except BackendUnreachable as exc:  # nothing sent yet: try the next
                last_error = exc
                router.up[index] = False
                logger.warning("backend %d unreachable (%s); trying the next", index, exc)
            finally:
                router.in_flight[index] -= 1
        err = api.unavailable("no backend could take the request (" + (
            f"{type(last_error).__name__}: {last_error}" if last_error else "none is up") + ")")
        await vllm_app.send_json(send, err.status, err.body(), err.headers)


# Replicas, request limits and process settings: common.deploy_options.router_options.
@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress()
class RoundRobinRouter:
    """Spreads requests round-robin over backend deployments, skipping ones that are down."""

    def __init__(self, serve_config: ServeConfig, *backends: Any):
        self.serve_config = serve_config
        self.backends = list(backends)
        self.urls: list[str | None] = [None] * len(backends)  # last known
        self.up = [False] * len(backends)
        self.client = BackendClient()
        # Each replica starts its rotation elsewhere, so that replicas together spread evenly.
        self._turn = itertools.count(random.randrange(max(len(backends), 1)))
        self._prober: asyncio.Task | None = None
        self._first_round = asyncio.Event()
        # --routing prefix: requests being answered per backend, and whose prompts each served.
        self.in_flight = [0] * len(backends)
        self.prefixes = prefix_routing.PrefixIndex()

    async def __serve_build_asgi_app__(self):
        return RouterApp(self)

    async def probed(self) -> None:
        """Returns once every backend has been asked for its URL at least once."""
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())
        await self._first_round.wait()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(i) for i in range(len(self.backends))))
            self._first_round.set()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _probe(self, index: int) -> None:
        """Up: the backend names its URL through Serve (its engine and server run) and answers
        over HTTP at that URL, the path requests take (a blocked port is down, not up)."""
        why: str | None
        try:
            url = await asyncio.wait_for(self.backends[index].endpoint.remote(),
                                         timeout=PROBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - timeout, no replica, replica died: all "down"
            url, why = None, f"no answer through Serve ({type(exc).__name__})"
        else:
            why = "its engine or server is down" if url is None else \
                await self.client.reachable(url, PROBE_TIMEOUT_S)
        alive = url is not None and why is None
        if alive != self.up[index]:
            logger.warning("backend %d is now %s", index,
                           f"up at {url}" if alive else f"DOWN: {why}")
        self.up[index] = alive
        if alive:
            self.urls[index] = url

    def order(self, session: str | None = None, body: bytes = b"") -> list[int]:
        """Backends to try for the next request: round-robin over the ones up, then the rest.
        With --routing session and a session header: the backends ranked by a hash of the
        session and each backend (rendezvous hashing), so a session keeps its backend while it
        is up, and only the sessions of a backend that goes down move. With --routing prefix:
        first the backend that prefix_routing.choose() picks among those up."""
        count = len(self.backends)
        if self.serve_config.routing == "prefix" and any(self.up):
            pick = self._prefix_pick(body)
            rest = [i for i in self._rotation(count) if i != pick]
            return [pick] + [i for i in rest if self.up[i]] + [i for i in rest if not self.up[i]]
        if session and self.serve_config.routing == "session":
            rotation = sorted(range(count), key=lambda i: hashlib.blake2b(
                f"{session}\0{i}".encode(), digest_size=8).digest(), reverse=True)
        else:
            rotation = self._rotation(count)
        return [i for i in rotation if self.up[i]] + [i for i in rotation if not self.up[i]]

    def _rotation(self, count: int) -> list[int]:
        start = next(self._turn)
        return [(start + k) % count for k in range(count)]

    def _prefix_pick(self, body: bytes) -> int:
        try:
            hashes = prefix_routing.request_blocks(json.loads(body or b"null"))
        except ValueError:
            hashes = []
        loads = {i: float(self.in_flight[i]) for i in range(len(self.backends)) if self.up[i]}
        pick, _ = prefix_routing.choose(self.prefixes, hashes, loads,
                                        self.serve_config.prefix_imbalance)
        return pick

    async def healthy(self) -> bool:
        return any(self.up)
