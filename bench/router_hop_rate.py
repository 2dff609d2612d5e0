"""Streamed chunks per second through the router's hop to a backend: a Serve handle call (gRPC) vs the backend's own HTTP server."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
HOPS = ("handle", "http")


def streaming_app(items: int, size: int, interval_s: float):
    """An ASGI app streaming `items` chunks of `size` bytes, one every `interval_s`."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(items):
            await send({"type": "http.response.body", "body": b"x" * size, "more_body": True})
            await asyncio.sleep(interval_s)
        await send({"type": "http.response.body", "body": b""})
    return app


def gap_stats(gaps: list[float], chunks: float, messages: int, took: float) -> dict[str, float]:
    """Chunks/s, chunks per message, and the gaps between chunks as the relay saw them (a chunk
    that arrived inside a bigger message counts as a zero gap)."""
    cuts = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [0.0] * 99
    return {"took_s": took, "chunks_per_s": chunks / took,
            "chunks_per_message": chunks / max(messages, 1),
            "gap_p50_ms": 1000 * cuts[49], "gap_p99_ms": 1000 * cuts[98]}


def build_app():
    from ray import serve

    @serve.deployment(max_ongoing_requests=100_000)
    class Source:
        """Stands in for a backend: the same stream through a handle call or its own server."""

        def __init__(self):
            self.http = None

        async def stream(self, items: int, size: int, interval_s: float):
            queue: asyncio.Queue = asyncio.Queue()
            task = asyncio.ensure_future(streaming_app(items, size, interval_s)(
                {}, None, queue.put))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            while (message := await queue.get()) is not None:
                if message.get("body"):
                    yield message["body"]

        async def endpoint(self) -> str:
            from replica.backend_http import BackendHttpServer

            if self.http is None:
                async def app(scope, receive, send):
                    query = dict(p.split("=") for p in scope["query_string"].decode().split("&"))
                    await streaming_app(int(query["items"]), int(query["size"]),
                                        float(query["interval"]))(scope, receive, send)
                self.http = BackendHttpServer(app, "127.0.0.1", 0)
                await self.http.start()
            return self.http.url

    @serve.deployment(max_ongoing_requests=100_000)
    class Relay:
        """Stands in for the router: reads concurrent streams from the source over one hop."""

        def __init__(self, source):
            self.source = source
            from replica.backend_http import BackendClient
            self.client = BackendClient()

        async def run(self, hop: str, streams: int, items: int, size: int,
                      interval_s: float) -> dict[str, float]:
            gaps: list[float] = []
            totals = {"messages": 0, "bytes": 0}
            url = await self.source.endpoint.remote() if hop == "http" else None
            handle = self.source.options(stream=True)

            def got(chunk: bytes, last: list[float]) -> None:
                now = time.perf_counter()
                if last:
                    gaps.extend([0.0] * (len(chunk) // size - 1))
                    gaps.append(now - last[0])
                last[:] = [now]
                totals["messages"] += 1
                totals["bytes"] += len(chunk)

            async def one() -> None:
                last: list[float] = []
                if hop == "handle":
                    async for chunk in handle.stream.remote(items, size, interval_s):
                        got(chunk, last)
                    return

                async def send(message: dict) -> None:
                    if message.get("body"):
                        got(message["body"], last)
                scope = {"method": "GET", "path": "/", "headers": [], "query_string":
                         f"items={items}&size={size}&interval={interval_s}".encode()}
                await self.client.forward(url, scope, b"", send)

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(streams)))
            return gap_stats(gaps, totals["bytes"] / size, totals["messages"],
                             time.perf_counter() - started)

    return Relay.bind(Source.bind())


async def measure(handle, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Alternating rounds of each hop, after a warm-up of both."""
    hops = args.hops.split(",")
    for hop in hops:
        await handle.run.remote(hop, 4, 10, args.item_bytes, 0.0)
    results: dict[str, list[dict[str, float]]] = {hop: [] for hop in hops}
    for _ in range(args.rounds):
        for hop in hops:
            results[hop].append(await handle.run.remote(
                hop, args.streams, args.items, args.item_bytes, args.interval_ms / 1000))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--items", type=int, default=300, help="chunks per stream")
    parser.add_argument("--item-bytes", type=int, default=200, help="bytes per chunk")
    parser.add_argument("--interval-ms", type=float, default=6.0,
                        help="the source's pause between chunks of one stream (0: flat out)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--hops", default=",".join(HOPS),
                        help="comma-separated subset of " + ", ".join(HOPS))
    args = parser.parse_args(argv)
    # The project's default ingress settings (common/deploy_options.py: INGRESSES["haproxy"]), under
    # which a handle call goes over Serve's gRPC; the local cluster inherits this environment.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray
    from ray import serve

    from common.deploy_options import replica_code_runtime_env

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4,
             log_to_driver=False, runtime_env=replica_code_runtime_env())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        handle = serve.run(build_app(), name="hop", route_prefix=None)
        results = asyncio.run(measure(handle, args))
        print(f"{args.streams} streams x {args.items} chunks x {args.item_bytes} B, one every "
              f"{args.interval_ms} ms per stream (source's pace "
              f"{args.items * args.interval_ms / 1000:.2f} s); {args.rounds} rounds, medians:")
        for hop, rounds in results.items():
            med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            print(f"  {hop:6s} took {med['took_s']:.2f} s, chunks/s {med['chunks_per_s']:,.0f}, "
                  f"chunks per message {med['chunks_per_message']:.2f}, gap p50 "
                  f"{med['gap_p50_ms']:.2f} ms, p99 {med['gap_p99_ms']:.2f} ms")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
