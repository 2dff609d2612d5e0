"""Unit tests of the router's hop: which transport its backend handles use, how a backend's chunks travel (no Ray)."""
from __future__ import annotations

import asyncio

import pytest

from replica import ingress, vllm_app


class RecordingHandle:
    """Stands in for a backend's DeploymentHandle: records the options the router asks for."""

    def __init__(self):
        self.options_seen: list[dict] = []

    def options(self, **kwargs):
        self.options_seen.append(kwargs)
        return self


@pytest.mark.parametrize("grpc_on", [True, False])
def test_router_calls_backends_over_the_transport_its_replica_settings_pick(monkeypatch, grpc_on):
    # The handles arrive pickled from the driver with the driver's default; the router must
    # use what Serve's settings in its own process say (gRPC under the throughput settings).
    from ray.serve._private import constants

    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", grpc_on)
    backends = [RecordingHandle(), RecordingHandle()]
    # The class as written, under Serve's ingress wrapper (whose __init__ builds the ASGI app).
    router_class = next(c for c in ingress.RoundRobinRouter.func_or_class.__mro__
                        if "order" in vars(c))
    router = router_class(object(), *backends)
    for backend in backends:
        assert backend.options_seen, "the router used a handle without choosing its transport"
        assert all(seen["_by_reference"] is (not grpc_on) for seen in backend.options_seen)
    assert any(seen.get("stream") for seen in backends[0].options_seen)
    assert router.order() in ([0, 1], [1, 0])


def test_backend_chunks_sent_while_the_caller_is_busy_travel_as_one():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"d"})

    async def scenario():
        response = await vllm_app.asgi_call(app, "POST", "/", [], b"")
        await asyncio.sleep(0.01)  # the app has sent everything by now
        return response.status, [chunk async for chunk in response.chunks]

    status, chunks = asyncio.run(scenario())
    assert status == 200 and chunks == [b"abcd"]


def test_backend_chunks_sent_apart_stay_apart():
    gate = asyncio.Event

    async def scenario():
        next_part = gate()

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await next_part.wait()
            await send({"type": "http.response.body", "body": b"second", "more_body": False})

        response = await vllm_app.asgi_call(app, "POST", "/", [], b"")
        chunks = response.chunks
        first = await chunks.__anext__()
        next_part.set()
        rest = [chunk async for chunk in chunks]
        return [first, *rest]

    assert asyncio.run(scenario()) == [b"first", b"second"]


@pytest.mark.parametrize("env,by_reference", [
    ({}, True), ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, False),
    ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}, True),
    ({"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, False)])
def test_transport_falls_back_to_serve_variables_when_its_constant_moves(monkeypatch, env,
                                                                          by_reference):
    import sys

    monkeypatch.setitem(sys.modules, "ray.serve._private.constants", None)  # import fails
    for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_USE_GRPC_BY_DEFAULT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ingress.handle_transport() == {"_by_reference": by_reference}
