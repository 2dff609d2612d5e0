"""Unit tests of the router's hop over HTTP: a backend's own server, the router's forwarding and failover (no Ray)."""
from __future__ import annotations

import asyncio
import json

from replica import ingress
from replica.backend_http import BackendClient, BackendHttpServer, BackendUnreachable


async def echo_app(scope, receive, send):
    """Answers with what it got; /stream sends three chunks apart, /wait streams until the
    client leaves and records that it saw http.disconnect."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/wait":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        echo_app.disconnected.set()
        return
    answer = json.dumps({"method": scope["method"], "path": scope["path"],
                         "query": scope["query_string"].decode(), "body": body.decode(),
                         "headers": headers}).encode()
    await send({"type": "http.response.start", "status": 418,
                "headers": [(b"content-type", b"application/json"), (b"x-serve-node", b"n1")]})
    await send({"type": "http.response.body", "body": answer})


class Recorder:
    """An ASGI send() that keeps what the router would send its client, with arrival times."""

    def __init__(self):
        self.messages: list[dict] = []
        self.times: list[float] = []

    async def __call__(self, message: dict) -> None:
        self.messages.append(message)
        self.times.append(asyncio.get_running_loop().time())

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages
                        if m["type"] == "http.response.body")


def scope_for(method: str, path: str, query: bytes = b"", headers=()) -> dict:
    return {"type": "http", "method": method, "path": path, "query_string": query,
            "headers": list(headers)}


def forwarded(scope: dict, body: bytes = b"") -> Recorder:
    """What the router's client sends back for one request to echo_app on a backend server."""
    async def scenario():
        server = BackendHttpServer(echo_app, "127.0.0.1", 0)
        url = await server.start()
        client = BackendClient()
        send = Recorder()
        try:
            await client.forward(url, scope, body, send)
        finally:
            await client.close()
            await server.drain(5)
        return send

    return asyncio.run(scenario())


def test_forward_carries_method_path_query_headers_body_and_the_answer():
    send = forwarded(scope_for("POST", "/v1/x", b"a=1",
                               [(b"content-type", b"application/json"),
                                (b"authorization", b"Bearer k"),
                                (b"connection", b"keep-alive")]), b'{"p": 1}')
    start = send.messages[0]
    assert start["status"] == 418
    assert (b"x-serve-node", b"n1") in start["headers"]
    assert not any(k.lower() in (b"content-length", b"transfer-encoding")
                   for k, _ in start["headers"])
    seen = json.loads(send.body)
    assert (seen["method"], seen["path"], seen["query"], seen["body"]) == (
        "POST", "/v1/x", "a=1", '{"p": 1}')
    assert seen["headers"]["authorization"] == "Bearer k"
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["headers"]["content-length"] == "8"
    assert send.messages[-1] == {"type": "http.response.body", "body": b""}


def test_forward_streams_chunks_as_they_come():
    send = forwarded(scope_for("GET", "/stream"))
    chunks = [(m["body"], t) for m, t in zip(send.messages, send.times)
              if m["type"] == "http.response.body" and m["body"]]
    assert [c for c, _ in chunks] == [b"a", b"b", b"c"]
    assert all(later - earlier > 0.02 for (_, earlier), (_, later) in zip(chunks, chunks[1:]))


def test_a_client_that_leaves_closes_the_backend_connection():
    async def scenario():
        echo_app.disconnected = asyncio.Event()
        server = BackendHttpServer(echo_app, "127.0.0.1", 0)
        url = await server.start()
        client = BackendClient()
        send = Recorder()
        forwarding = asyncio.ensure_future(client.forward(url, scope_for("GET", "/wait"), b"",
                                                          send))
        while b"started" not in send.body:
            await asyncio.sleep(0.01)
        forwarding.cancel()  # what Serve does to the request when its client goes away
        await asyncio.wait_for(echo_app.disconnected.wait(), 10)
        await client.close()
        await server.drain(5)

    asyncio.run(scenario())


def test_an_unreachable_backend_raises_before_anything_is_sent():
    async def scenario():
        server = BackendHttpServer(echo_app, "127.0.0.1", 0)
        url = await server.start()
        assert server.running
        await server.drain(5)  # the port is closed now
        assert not server.running  # so the backend's endpoint() and health check say down
        client = BackendClient()
        send = Recorder()
        try:
            await client.forward(url, scope_for("GET", "/"), b"", send)
        except BackendUnreachable:
            return send.messages
        finally:
            await client.close()
        raise AssertionError("no BackendUnreachable")

    assert asyncio.run(scenario()) == []


def test_a_taken_port_is_a_clear_error():
    async def scenario():
        first = BackendHttpServer(echo_app, "127.0.0.1", 0)
        url = await first.start()
        port = int(url.rsplit(":", 1)[1])
        try:
            await BackendHttpServer(echo_app, "127.0.0.1", port).start()
        except RuntimeError as exc:
            return str(exc)
        finally:
            await first.drain(5)

    assert "--backend-port" in asyncio.run(scenario())


class FakeEndpointHandle:
    """A backend's DeploymentHandle as the router probes it: endpoint() answers a URL or fails."""

    def __init__(self, url):
        self.url = url
        self.endpoint = self

    def remote(self):
        async def answer():
            if isinstance(self.url, Exception):
                raise self.url
            return self.url
        return answer()


def router_with(*handles, routing="spread"):
    # The class as written, under Serve's ingress wrapper (whose __init__ builds the ASGI app).
    router_class = next(c for c in ingress.RoundRobinRouter.func_or_class.__mro__
                        if "order" in vars(c))
    from replica.config import ServeConfig

    return router_class(ServeConfig(routing=routing), *handles)


async def post_statuses(app, count: int) -> list[int]:
    """The status of each of `count` POST / requests through the router's app."""
    statuses = []
    for _ in range(count):
        send = Recorder()

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        await app(scope_for("POST", "/"), receive, send)
        statuses.append(send.messages[0]["status"])
    return statuses


def test_router_skips_an_unreachable_backend_and_alternates_over_the_rest():
    async def scenario():
        server = BackendHttpServer(echo_app, "127.0.0.1", 0)
        url = await server.start()
        dead = BackendHttpServer(echo_app, "127.0.0.1", 0)
        dead_url = await dead.start()
        await dead.drain(5)
        router = router_with(FakeEndpointHandle(url), FakeEndpointHandle(dead_url),
                             FakeEndpointHandle(RuntimeError("replica gone")))
        app = ingress.RouterApp(router)
        statuses = await post_statuses(app, 4)
        up = list(router.up)
        await router.client.close()
        await server.drain(5)
        return statuses, up

    statuses, up = asyncio.run(scenario())
    assert statuses == [418] * 4  # every request answered by the live backend
    assert up == [True, False, False]


def test_router_answers_503_when_no_backend_is_up():
    async def scenario():
        router = router_with(FakeEndpointHandle(None))
        app = ingress.RouterApp(router)
        send = Recorder()

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await app(scope_for("GET", "/"), receive, send)
        return send.messages[0]["status"], json.loads(send.body)

    status, body = asyncio.run(scenario())
    assert status == 503 and body["error"]["code"] == 503


def test_router_order_alternates():
    router = router_with(FakeEndpointHandle("http://a"), FakeEndpointHandle("http://b"))
    router.up = [True, True]
    firsts = [router.order()[0] for _ in range(4)]
    assert sorted(firsts) == [0, 0, 1, 1] and firsts[0] != firsts[1]


def test_session_routing_keeps_a_session_on_its_backend_while_it_is_up():
    handles = [FakeEndpointHandle(f"http://{name}") for name in "abc"]
    router = router_with(*handles, routing="session")
    router.up = [True, True, True]
    sessions = [f"conversation-{i}" for i in range(30)]
    first = {s: router.order(s)[0] for s in sessions}
    assert all(router.order(s)[0] == first[s] for s in sessions)   # every time the same
    assert set(first.values()) == {0, 1, 2}                         # and spread over all
    router.up = [True, False, True]                                 # b goes down:
    moved = {s: router.order(s)[0] for s in sessions}
    assert all(moved[s] == first[s] for s in sessions if first[s] != 1)   # only b's move
    assert all(moved[s] in (0, 2) for s in sessions)
    # Without the header, or with --routing spread, requests alternate as before.
    assert {router.order(None)[0] for _ in range(4)} == {0, 2}
    spread = router_with(*handles)
    spread.up = [True, True, True]
    assert len({spread.order("conversation-1")[0] for _ in range(3)}) == 3



def test_a_backend_whose_port_does_not_answer_is_down_and_gets_no_requests():
    """A backend that Serve says is up but whose HTTP port takes connections and never answers
    (as behind a firewall that drops them): the probe takes the traffic's path, so the backend
    is down and requests go to the other, instead of each waiting on it."""
    async def scenario():
        server = BackendHttpServer(echo_app, "127.0.0.1", 0)
        url = await server.start()
        held = []

        async def silent(reader, writer):
            held.append(writer)  # never answers, never closes

        blackhole = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = blackhole.sockets[0].getsockname()[1]
        router = router_with(FakeEndpointHandle(f"http://127.0.0.1:{port}"),
                             FakeEndpointHandle(url))
        app = ingress.RouterApp(router)
        statuses = await post_statuses(app, 4)
        up = list(router.up)
        router._prober.cancel()
        await router.client.close()
        await server.drain(5)
        blackhole.close()
        return statuses, up

    statuses, up = asyncio.run(scenario())
    assert up == [False, True]
    assert statuses == [418] * 4
