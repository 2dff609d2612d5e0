"""Stream items per second through one Serve handle hop (the placement-group router's hop), by transport."""
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
TRANSPORTS = {"grpc": False, "actor": True}  # name -> the handle's _by_reference


def build_app():
    from ray import serve

    @serve.deployment(max_ongoing_requests=100_000)
    class Source:
        """Stands in for a router's backend: an ASGI app streaming a chunk every `interval_s`,
        answered through the backend's own path (replica.vllm_app.call_through)."""

        async def stream(self, items: int, size: int, interval_s: float):
            from replica import vllm_app
            from replica.api import RawRequest

            async def app(scope, receive, send):
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for _ in range(items):
                    await send({"type": "http.response.body", "body": b"x" * size,
                                "more_body": True})
                    await asyncio.sleep(interval_s)
                await send({"type": "http.response.body", "body": b""})

            raw = RawRequest(method="POST", path="/", headers={}, body=b"")
            async for item in vllm_app.call_through(app, raw):
                yield item

    @serve.deployment(max_ongoing_requests=100_000)
    class Relay:
        """Stands in for the router: reads concurrent streams from the source through a handle."""

        def __init__(self, source):
            self.source = source

        async def run(self, streams: int, items: int, size: int, interval_s: float,
                      by_reference: bool) -> dict[str, float]:
            handle = self.source.options(stream=True, _by_reference=by_reference)

            async def one() -> tuple[int, int]:
                messages = received = 0
                async for item in handle.stream.remote(items, size, interval_s):
                    if isinstance(item, bytes):
                        messages += 1
                        received += len(item)
                return messages, received

            started = time.perf_counter()
            counts = await asyncio.gather(*(one() for _ in range(streams)))
            took = time.perf_counter() - started
            messages = sum(m for m, _ in counts)
            chunks = sum(r for _, r in counts) / size
            return {"took_s": took, "ideal_s": items * interval_s, "chunks_per_s": chunks / took,
                    "messages_per_s": messages / took,
                    "chunks_per_message": chunks / max(messages, 1)}

    return Relay.bind(Source.bind())


async def measure(handle, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Alternating rounds of each transport (the driver's handle needs a running loop when
    Serve's router runs on the caller's loop, as the throughput settings make it)."""
    for by_reference in TRANSPORTS.values():  # warm both paths
        await handle.run.remote(4, 10, args.item_bytes, 0.0, by_reference)
    results: dict[str, list[dict[str, float]]] = {t: [] for t in args.transports.split(",")}
    for _ in range(args.rounds):
        for transport in results:
            results[transport].append(await handle.run.remote(
                args.streams, args.items, args.item_bytes, args.interval_ms / 1000,
                TRANSPORTS[transport]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--items", type=int, default=300, help="items per stream")
    parser.add_argument("--item-bytes", type=int, default=200, help="bytes per item")
    parser.add_argument("--interval-ms", type=float, default=5.0,
                        help="the source's pause between chunks of one stream (0: flat out)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help="comma-separated subset of " + ", ".join(TRANSPORTS))
    args = parser.parse_args(argv)
    # The project's default ingress settings (common/deploy.py: INGRESSES["haproxy"]); the
    # local cluster's workers inherit this process's environment.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray
    from ray import serve

    from common.deploy import replica_code_runtime_env

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4,
             log_to_driver=False, runtime_env=replica_code_runtime_env())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        handle = serve.run(build_app(), name="hop", route_prefix=None)
        results = asyncio.run(measure(handle, args))
        print(f"{args.streams} streams x {args.items} chunks x {args.item_bytes} B, one every "
              f"{args.interval_ms} ms per stream; {args.rounds} rounds, medians:")
        for transport, rounds in results.items():
            medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            print(f"  {transport:6s} took {medians['took_s']:.2f} s (source's pace "
                  f"{medians['ideal_s']:.2f} s), chunks/s {medians['chunks_per_s']:,.0f}, "
                  f"messages/s {medians['messages_per_s']:,.0f}, chunks per message "
                  f"{medians['chunks_per_message']:.2f}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
