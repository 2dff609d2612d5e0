"""1-request latency of the router's path with a stand-in backend (no engine): where the router's milliseconds go."""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

EPILOG = """rows (sequential requests, the same small JSON answer from every path):
  backend  the stand-in backend's own HTTP server (replica/backend_http.py), called directly
  plain    HAProxy -> a Serve ingress replica answering from the same ASGI app itself
  router   HAProxy -> the RoundRobinRouter replica -> the backend's own server (the
           placement-group path, the real router deployment with common.deploy_options.router_options)
  prefix   HAProxy asks the PrefixRoute deployment (--routing prefix: the real route deployment,
           request router and shared prefix index) with the body, then sends the request to the
           replica it names: a replica answering from the same ASGI app as plain
Derived: router - plain (what the router adds to a deployment that answers HTTP itself),
prefix - plain (what consulting the route deployment adds) and plain - backend (HAProxy plus
Serve's request handling in a replica). Every row sends the same chat request (--body-chars);
rows alternate round by round; medians of all requests. --busy N keeps N processes spinning
meanwhile, as engines on a CPU machine do, to show what the hops cost when cores are taken.

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/router_path_latency.py
"""
ANSWER = json.dumps({"text": "x" * 200, "node": "stand-in"}).encode()


async def answer_app(scope, receive, send) -> None:
    """What every path ends in: read the request, answer a fixed JSON body."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})


def build_apps():
    from ray import serve

    from common.deploy_options import route_options, router_options
    from replica import ray_compat
    from replica.config import ServeConfig, replica_env
    from replica.ingress import RoundRobinRouter
    from replica.prefix_routing import DEFAULT_IMBALANCE, PrefixRoute, request_router_config

    actor = {"num_cpus": 0, "runtime_env": {"env_vars": replica_env(None)}}

    @serve.deployment(ray_actor_options=actor)
    class StandInBackend:
        """The backend interface the router uses, without an engine."""

        def __init__(self):
            self.http = None

        async def endpoint(self) -> str:
            from replica.backend_http import BackendHttpServer

            if self.http is None:
                self.http = BackendHttpServer(answer_app, "127.0.0.1", 0)
                await self.http.start()
            return self.http.url

    @serve.deployment(ray_actor_options=actor)
    @serve.ingress()
    class Plain:
        async def __serve_build_asgi_app__(self):
            return answer_app

    serve_config = ServeConfig()
    router = RoundRobinRouter.options(**router_options(serve_config, 1, 1)).bind(
        serve_config, StandInBackend.bind())
    routed = Plain.options(name="RoutedPlain",
                           request_router_config=request_router_config(DEFAULT_IMBALANCE)).bind()
    prefix = ray_compat.with_ingress_request_router(
        routed, PrefixRoute.options(**route_options(serve_config)).bind(routed))
    return router, Plain.bind(), prefix


def chat_payload(chars: int) -> bytes:
    """A chat request of about `chars` characters of text (a system prompt and one turn)."""
    words = " ".join(f"w{i}" for i in range(chars // 5 + 1))
    messages = [{"role": "system", "content": words[: chars // 2]},
                {"role": "user", "content": words[chars // 2: chars]}]
    return json.dumps({"model": "m", "messages": messages, "max_tokens": 1}).encode()


def spin(stop) -> None:
    while not stop.is_set():
        pass


async def measure(urls: dict[str, str], n: int, rounds: int, payload: bytes
                  ) -> dict[str, list[float]]:
    import aiohttp

    headers = {"content-type": "application/json"}
    times: dict[str, list[float]] = {row: [] for row in urls}
    async with aiohttp.ClientSession() as session:
        async def one(url: str) -> float:
            started = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            return time.perf_counter() - started

        for url in urls.values():  # warm-up: connections, the router's first probe
            for _ in range(50):
                await one(url)
        for _ in range(rounds):
            for row, url in urls.items():
                times[row] += [await one(url) for _ in range(n)]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-requests", type=int, default=100,
                        help="requests per row and round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="alternating rounds (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="HAProxy's port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--body-chars", type=int, default=8000,
                        help="characters of text in each request (default: %(default)s)")
    parser.add_argument("--busy", type=int, default=0,
                        help="processes kept spinning while measuring (default: %(default)s)")
    args = parser.parse_args(argv)
    from common.deploy import start_serve
    from common.deploy_options import controller_env, replica_code_runtime_env

    # The project's default ingress, with the body forwarded to a consulted route deployment
    # (--routing prefix; it changes nothing for apps without one); the local cluster inherits it.
    os.environ.update(controller_env("haproxy", "prefix"))
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray
    from ray import serve

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4,
             log_to_driver=False, runtime_env=replica_code_runtime_env())
    try:
        start_serve("127.0.0.1", args.port, "HeadOnly", "haproxy")
        router, plain, prefix = build_apps()
        serve.run(router, name="router", route_prefix="/")
        serve.run(plain, name="plain", route_prefix="/plain")
        serve.run(prefix, name="prefix", route_prefix="/prefix")
        backend = serve.get_deployment_handle("StandInBackend", "router")

        async def run() -> dict[str, list[float]]:
            base = f"http://127.0.0.1:{args.port}"
            urls = {"backend": await backend.endpoint.remote() + "/",
                    "plain": base + "/plain", "router": base + "/", "prefix": base + "/prefix"}
            return await measure(urls, args.num_requests, args.rounds,
                                 chat_payload(args.body_chars))

        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True)
                    for _ in range(args.busy)]
        for process in spinners:
            process.start()
        try:
            times = asyncio.run(run())
        finally:
            stop.set()
            for process in spinners:
                process.join(timeout=10)
    finally:
        ray.shutdown()
    p50 = {row: 1000 * statistics.median(values) for row, values in times.items()}
    print(f"{args.rounds} rounds x {args.num_requests} sequential requests per row "
          f"({args.body_chars} characters each, {args.busy} spinning processes); p50 / mean ms")
    for row, values in times.items():
        print(f"  {row:8s} {p50[row]:.3f} / {1000 * statistics.fmean(values):.3f}")
    print(f"  router - plain   {p50['router'] - p50['plain']:.3f} (the router's own hop)")
    print(f"  prefix - plain   {p50['prefix'] - p50['plain']:.3f} (consulting the route deployment)")
    print(f"  plain - backend  {p50['plain'] - p50['backend']:.3f} (HAProxy + Serve's replica)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
