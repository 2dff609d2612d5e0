"""End-to-end tests of load_test.py against an in-process fake completion service on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter

import pytest
from aiohttp import web

import load_test
from common.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from loadgen.client import LoadConfig, run_load_sync, summarize

NODE_A = "a" * 56
NODE_B = "b" * 56


class FakeService:
    """Mimics the service's API; counts what it sees so tests can compare with the report.

    Successful answers take their `node` from `node_pattern` in turn, so the split is exact.
    Every `fail_every`-th request gets a 503, every `slow_every`-th one sleeps `slow_s` first.
    """

    def __init__(self, node_pattern=(NODE_A, NODE_B), fail_every=0, slow_every=0, slow_s=3.0,
                 hold_s=0.005, tokens=4, api_key=None, with_node=True, garbage_every=0,
                 replica_nodes=None, sticky=False, think=0):
        self.node_pattern = node_pattern
        self.think = think  # streamed chats: this many reasoning chunks before the answer
        self.fail_every = fail_every
        self.slow_every = slow_every
        self.slow_s = slow_s
        self.hold_s = hold_s
        self.tokens = tokens
        self.api_key = api_key
        self.with_node = with_node
        self.garbage_every = garbage_every
        self.replica_nodes = replica_nodes  # node -> replicas, served on GET /nodes when set
        self.sticky = sticky  # chat: the node from the x-session-id header, as affinity would
        self.sessions = []
        self.requests = 0
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.nodes = Counter()
        self.bodies = []
        self.paths = Counter()
        self.port = 0
        self._loop = None
        self._runner = None
        self._thread = None

    # -- lifecycle: the server runs on its own loop in a thread, load_test.main on the test's thread
    def start(self):
        ready = threading.Event()

        def serve():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake service did not start"
        return self

    async def _start(self):
        app = web.Application()
        app.router.add_post("/", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        if self.replica_nodes is not None:
            app.router.add_get("/nodes", self.nodes_info)
            app.router.add_get("/v1/models", self.models_info)
        # handler_cancellation: a request the client timed out on stops counting as in flight.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                   shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    # -- the API
    async def nodes_info(self, request: web.Request):
        self.paths[request.path] += 1
        return web.json_response({
            "node": self.node_pattern[0], "model": "DeepSeek-R1", "engine_alive": True,
            "replica_nodes": self.replica_nodes,
            "engine_layout": {"device": "cpu", "tensor_parallel_size": 1,
                              "pipeline_parallel_size": 1, "max_model_len": 512}})

    async def models_info(self, request: web.Request):
        self.paths[request.path] += 1
        return web.json_response({"object": "list", "data": [
            {"id": "DeepSeek-R1", "object": "model", "root": "/models/DeepSeek-R1",
             "max_model_len": 512}]})

    async def handle(self, request: web.Request):
        self.requests += 1
        number = self.requests
        self.paths[request.path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            self.bodies.append(body)
            if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": {"message": "bad key", "type": "auth",
                                                    "code": 401}}, status=401)
            if self.fail_every and number % self.fail_every == 0:
                return web.json_response(
                    {"error": {"message": "overloaded", "type": "overloaded", "code": 503}},
                    status=503, headers={"Retry-After": "1"})
            if self.garbage_every and number % self.garbage_every == 0:
                if body.get("stream"):  # an event stream cut off before "data: [DONE]"
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                    await response.prepare(request)
                    await response.write(b'data: {"choices": [{"text": "z", "index": 0}]}\n\n')
                    await response.write_eof()
                    return response
                return web.Response(text="<html>not json</html>", content_type="text/html")
            if self.slow_every and number % self.slow_every == 0:
                await asyncio.sleep(self.slow_s)
            await asyncio.sleep(self.hold_s)
            node = self.node_pattern[self.answered % len(self.node_pattern)]
            session = request.headers.get("x-session-id")
            self.sessions.append(session)
            if self.sticky and session:
                node = self.node_pattern[int(session.rsplit("-", 1)[1]) % len(self.node_pattern)]
            self.answered += 1
            self.nodes[node] += 1
            tokens = min(self.tokens, body["max_tokens"])
            if body.get("stream"):
                return await self._stream(request, body, node, tokens)
            if request.path == "/v1/chat/completions":
                return web.json_response({
                    "id": f"chatcmpl-{number}", "object": "chat.completion", "created": 1,
                    "model": "DeepSeek-R1", "choices": [{
                        "index": 0, "finish_reason": "length",
                        "message": {"role": "assistant", "content": f"answer-{number}"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": tokens,
                              "total_tokens": 3 + tokens}}, headers={"x-serve-node": node})
            answer = {"id": f"cmpl-{number}", "object": "text_completion", "created": 1,
                      "model": "DeepSeek-R1",
                      "choices": [{"text": "x" * tokens, "index": 0, "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": tokens,
                                "total_tokens": 3 + tokens}}
            if self.with_node:
                answer["node"] = node
            return web.json_response(answer)
        finally:
            self.in_flight -= 1

    async def _stream(self, request, body, node, tokens):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        openai = request.path != "/"
        chat = request.path == "/v1/chat/completions"
        usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}

        async def send(chunk):
            if self.with_node:
                chunk["node"] = node
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        for _ in range(self.think if chat else 0):
            await send({"id": "cmpl-s", "object": "chat.completion.chunk", "created": 1,
                        "model": "DeepSeek-R1", "choices": [{
                            "delta": {"reasoning": "hmm"}, "index": 0, "finish_reason": None}]})
            await asyncio.sleep(0.002)
        for position in range(tokens):
            last = position == tokens - 1
            choice = ({"delta": {"content": "y"}} if chat else {"text": "y"})
            chunk = {"id": "cmpl-s", "object": "text_completion", "created": 1,
                     "model": "DeepSeek-R1",
                     "choices": [{**choice, "index": 0,
                                  "finish_reason": "length" if last else None}]}
            if last and not openai:
                chunk["usage"] = usage
            await send(chunk)
            await asyncio.sleep(0.001)
        if openai and body.get("stream_options", {}).get("include_usage"):
            await send({"id": "cmpl-s", "object": "text_completion", "created": 1,
                        "model": "DeepSeek-R1", "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def service(request):
    options = getattr(request, "param", {})
    fake = FakeService(**options).start()
    yield fake
    fake.stop()


def run_cli(service, *args):
    return load_test.main(["--url", service.url, "--no-progress", *args])


def test_closed_loop_counts_split_and_json(service, tmp_path, capsys):
    service.node_pattern = (NODE_A, NODE_A, NODE_A, NODE_B)  # a known 75/25 split
    service.hold_s = 0.02
    out = tmp_path / "result.json"
    code = run_cli(service, "-c", "8", "-n", "100", "--max-tokens", "4", "--json", str(out),
                   "--json-requests")
    assert code == EXIT_OK
    assert service.requests == 100
    assert service.max_in_flight == 8
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["successes"] == 100 and summary["failures"] == 0
    assert summary["answered"] == service.requests
    assert summary["node_counts"] == {NODE_A: 75, NODE_B: 25}
    assert summary["balance"] == pytest.approx(25 / 75)
    assert summary["total_output_tokens"] == 400
    assert [n["node"] for n in data["nodes"]] == [NODE_A, NODE_B]
    assert data["nodes"][0]["share"] == pytest.approx(0.75)
    assert data["nodes"][0]["latency"]["count"] == 75
    assert data["parameters"]["concurrency"] == 8
    assert data["errors"] == {}
    assert len(data["requests"]) == 100
    assert sorted(r["index"] for r in data["requests"]) == list(range(100))
    report = capsys.readouterr().out
    assert "Successful requests:" in report and "Balance" in report
    assert "75.0%" in report and "25.0%" in report


def test_default_prompt_and_body(service):
    assert run_cli(service, "-c", "2", "-n", "4") == EXIT_OK
    body = service.bodies[0]
    assert body == {"prompt": "请简要介绍人工智能的发展历史", "max_tokens": 128}


def test_even_split_balance_is_one(service, tmp_path):
    out = tmp_path / "r.json"
    assert run_cli(service, "-c", "4", "-n", "40", "--json", str(out)) == EXIT_OK
    summary = json.loads(out.read_text())["summary"]
    assert summary["node_counts"] == {NODE_A: 20, NODE_B: 20}
    assert summary["balance"] == 1.0
    assert "requests" not in json.loads(out.read_text())


def test_expected_nodes_missing_node_gives_zero_balance(service, tmp_path, capsys):
    service.node_pattern = (NODE_A,)
    out = tmp_path / "r.json"
    assert run_cli(service, "-c", "2", "-n", "10", "--expected-nodes", "2",
                   "--json", str(out)) == EXIT_OK
    assert json.loads(out.read_text())["summary"]["balance"] == 0.0
    assert "only 1 of 2 expected nodes" in capsys.readouterr().out


def test_503_counted_as_error_kind(service, tmp_path, capsys):
    service.fail_every = 5
    out = tmp_path / "r.json"
    code = run_cli(service, "-c", "4", "-n", "50", "--json", str(out))
    assert code == EXIT_FAILURE
    assert service.requests == 50
    summary = json.loads(out.read_text())["summary"]
    assert summary["error_kinds"] == {"http_503": 10}
    assert summary["successes"] + summary["failures"] == 50 == service.requests
    assert summary["sample_errors"]["http_503"] == "overloaded"
    assert sum(summary["node_counts"].values()) == 40
    assert "http_503" in capsys.readouterr().out


def test_timeout_counted_and_run_continues(service, tmp_path):
    service.slow_every = 5
    service.slow_s = 3.0
    out = tmp_path / "r.json"
    code = run_cli(service, "-c", "4", "-n", "10", "--timeout", "0.3", "--json", str(out))
    assert code == EXIT_FAILURE
    summary = json.loads(out.read_text())["summary"]
    assert summary["error_kinds"] == {"timeout": 2}
    assert summary["successes"] == 8
    assert service.requests == 10


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_answers_are_invalid_response(service, tmp_path, stream):
    service.garbage_every = 4
    out = tmp_path / "r.json"
    args = ["-c", "2", "-n", "12", "--json", str(out)] + (["--stream"] if stream else [])
    assert run_cli(service, *args) == EXIT_FAILURE
    summary = json.loads(out.read_text())["summary"]
    assert summary["error_kinds"] == {"invalid_response": 3}
    assert summary["successes"] == 9


def test_streaming_ttft_tpot_itl(service, tmp_path, capsys):
    service.tokens = 5
    out = tmp_path / "r.json"
    code = run_cli(service, "--stream", "-c", "4", "-n", "12", "--max-tokens", "5",
                   "--json", str(out), "--json-requests")
    assert code == EXIT_OK
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["successes"] == 12
    assert summary["total_output_tokens"] == 60  # from the usage in the last chunk
    assert summary["ttft"]["count"] == 12
    assert summary["tpot"]["count"] == 12
    assert summary["itl"]["count"] == 12 * 4
    assert summary["itl"]["mean"] > 0
    assert summary["node_counts"] == {NODE_A: 6, NODE_B: 6}
    record = data["requests"][0]
    assert record["ttft"] is not None and record["ttft"] <= record["latency"]
    assert record["finish_reason"] == "length"
    assert service.bodies[0]["stream"] is True
    report = capsys.readouterr().out
    assert "TTFT" in report and "ITL" in report and "TPOT" in report


def test_reasoning_streams_time_the_first_answer_token_and_count_thinking(service, tmp_path,
                                                                        capsys):
    service.tokens, service.think = 3, 5
    out = tmp_path / "r.json"
    code = run_cli(service, "--endpoint", "/v1/chat/completions", "--stream", "-c", "2",
                   "-n", "6", "--max-tokens", "3", "--json", str(out), "--json-requests")
    assert code == EXIT_OK
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["reasoning_chunks"] == 6 * 5 and summary["answer_chunks"] == 6 * 3
    assert summary["ttfa"]["count"] == 6 and summary["ttfa"]["p50"] > summary["ttft"]["p50"]
    record = data["requests"][0]
    assert record["ttft"] < record["ttfa"] <= record["latency"]
    report = capsys.readouterr().out
    assert "TTFA" in report and "Reasoning / answer chunks" in report and "30 / 18" in report
    # A model that does not reason: no TTFA section.
    service.think = 0
    assert run_cli(service, "--endpoint", "/v1/chat/completions", "--stream", "-n", "2",
                   "--max-tokens", "3", "--json", str(out)) == EXIT_OK
    assert json.loads(out.read_text())["summary"]["ttfa"] is None
    assert "TTFA" not in capsys.readouterr().out


def test_openai_endpoint_stream_with_usage_chunk_and_api_key(service, tmp_path):
    service.api_key = "secret"
    service.tokens = 3
    out = tmp_path / "r.json"
    code = run_cli(service, "--endpoint", "/v1/completions", "--stream", "--model", "m1",
                   "--api-key", "secret", "-c", "2", "-n", "6", "--max-tokens", "3",
                   "--temperature", "0", "--ignore-eos", "--json", str(out))
    assert code == EXIT_OK
    assert service.paths == {"/v1/completions": 6}
    body = service.bodies[0]
    assert body["model"] == "m1" and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["ignore_eos"] is True
    data = json.loads(out.read_text())
    assert data["summary"]["total_output_tokens"] == 18
    assert data["parameters"]["api_key"] == "***"


def test_wrong_api_key_is_http_401(service):
    service.api_key = "secret"
    assert run_cli(service, "-c", "2", "-n", "4", "--api-key", "nope") == EXIT_FAILURE
    assert service.requests == 4


def test_missing_node_reported_as_unknown(service, tmp_path):
    service.with_node = False
    out = tmp_path / "r.json"
    assert run_cli(service, "-c", "2", "-n", "6", "--stream", "--json", str(out)) == EXIT_OK
    assert json.loads(out.read_text())["summary"]["node_counts"] == {"unknown": 6}


def test_poisson_rate_capped_by_concurrency(service, tmp_path):
    service.hold_s = 0.02
    out = tmp_path / "r.json"
    code = run_cli(service, "--request-rate", "500", "--seed", "1", "-c", "3", "-n", "30",
                   "--json", str(out))
    assert code == EXIT_OK
    assert service.requests == 30
    assert service.max_in_flight <= 3
    assert json.loads(out.read_text())["parameters"]["request_rate"] == 500


def test_duration_stops_issuing(service, tmp_path):
    service.hold_s = 0.01
    out = tmp_path / "r.json"
    code = run_cli(service, "-n", "0", "--duration", "0.3", "-c", "2", "--json", str(out))
    assert code == EXIT_OK
    summary = json.loads(out.read_text())["summary"]
    assert summary["successes"] == service.requests > 0


def test_prompt_file_cycled(service, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "first"}\nsecond plain line\n\n{"prompt": "third"}\n',
                       encoding="utf-8")
    assert run_cli(service, "-c", "1", "-n", "5", "--prompt-file", str(prompts)) == EXIT_OK
    assert [body["prompt"] for body in service.bodies] == [
        "first", "second plain line", "third", "first", "second plain line"]


def test_progress_plain_lines_when_not_a_tty(service, capsys):
    assert load_test.main(["--url", service.url, "-c", "2", "-n", "4"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "progress:" in err and "\r" not in err


def test_unreachable_service_one_line_message(capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = load_test.main(["--url", f"http://127.0.0.1:{port}", "--no-progress",
                           "-c", "4", "-n", "1000"])
    assert code == EXIT_FAILURE
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0]


@pytest.mark.parametrize("args", [
    ["-c", "0"], ["-n", "-1"], ["-n", "0"], ["--endpoint", "/v2"], ["--timeout", "0"],
    ["--request-rate", "-3"], ["--prompt-file", "/nonexistent/prompts.txt"], ["--bogus"],
])
def test_bad_flags_exit_usage(args, capsys):
    assert load_test.main(args) == EXIT_USAGE


def test_help_exits_zero(capsys):
    assert load_test.main(["--help"]) == 0
    assert "DEEPSEEK_SERVE_SERVICE_URL]" in capsys.readouterr().out


def test_programmatic_entry_point(service):
    service.node_pattern = (NODE_A, NODE_B, NODE_B)
    config = LoadConfig(url=service.url, concurrency=3, num_requests=30, max_tokens=2)
    result = run_load_sync(config)
    summary = summarize(result)
    assert len(result.results) == 30 == service.requests
    assert summary.node_counts == {NODE_B: 20, NODE_A: 10}
    assert summary.balance == pytest.approx(0.5)
    assert summary.latency.count == 30
    assert not summary.unreachable


@pytest.mark.parametrize("service", [{"replica_nodes": {NODE_A: 1, NODE_B: 1}}], indirect=True)
def test_only_a_report_asks_for_the_models(service, tmp_path):
    # A plain run sends the service one request besides the load (GET /nodes), as before.
    assert run_cli(service, "-c", "2", "-n", "4") == EXIT_OK
    assert service.paths["/nodes"] == 1 and service.paths["/v1/models"] == 0
    assert run_cli(service, "-c", "2", "-n", "4", "--report", str(tmp_path / "r.html")) == EXIT_OK
    assert service.paths["/nodes"] == 2 and service.paths["/v1/models"] == 1
    page = (tmp_path / "r.html").read_text()
    assert "/models/DeepSeek-R1" in page and "tensor_parallel_size" in page


@pytest.mark.parametrize("service", [{"sticky": True}, {"sticky": False}], indirect=True)
def test_conversations_carry_their_history_and_session(service, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = run_cli(service, "--conversations", "5", "--turns", "3", "-c", "2",
                   "--system-prompt-words", "40", "--prompt-file", str(_prompts(tmp_path)),
                   "--json", str(out), "--json-requests")
    assert code == EXIT_OK
    assert service.requests == 15 and set(service.paths) == {"/v1/chat/completions"}
    by_session = {}
    for session, body in zip(service.sessions, service.bodies):
        by_session.setdefault(session, []).append(body["messages"])
    assert sorted(by_session) == [f"conversation-{i}" for i in range(5)]
    for turns in by_session.values():
        assert [len(m) for m in turns] == [2, 4, 6]         # system + the history + the question
        system = turns[0][0]
        assert system["role"] == "system" and len(system["content"].split()) >= 40
        assert turns[2][:4] == turns[1]                      # each turn extends the last
        assert turns[2][4]["role"] == "assistant" and turns[2][4]["content"].startswith("answer-")
    report = capsys.readouterr().out
    data = json.loads(out.read_text())
    figures = data["summary"]["conversation"]
    assert figures["conversations"] == 5 and figures["completed"] == 5
    assert [t["count"] for t in figures["by_turn"]] == [5, 5, 5]
    assert all(r["answer"] is None for r in data["requests"])  # answers are not kept
    if service.sticky:
        assert figures["one_node"] == 5 and "All turns on one node:" in report
        assert "100.0% (5 of 5)" in report
    else:
        assert figures["one_node"] < 5


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first question\nsecond question\nthird question\n")
    return path


def test_streamed_conversations_pass_the_streamed_answer_on(service):
    config = LoadConfig(url=service.url, endpoint="/v1/chat/completions", conversations=2,
                        turns=2, stream=True, concurrency=2)
    result = run_load_sync(config)
    assert all(r.ok for r in result.results) and len(result.results) == 4
    later = [b for b in service.bodies if len(b["messages"]) == 3]
    assert len(later) == 2 and all(b["messages"][1]["content"] == "yyyy" for b in later)
    assert all(b["stream_options"] == {"include_usage": True} for b in service.bodies)
    assert summarize(result).conversation.by_turn[1].count == 2


@pytest.mark.parametrize("args", [["--conversations", "2", "--endpoint", "/v1/completions"],
                                  ["--conversations", "2", "--request-rate", "3"]])
def test_conversations_refuse_what_they_cannot_do(service, args, capsys):
    assert run_cli(service, *args) == EXIT_USAGE
    assert "--conversations" in capsys.readouterr().err
