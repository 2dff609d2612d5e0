"""Load generator for the completion service: async HTTP client, closed/Poisson loops, SSE, reports."""
from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, TextIO

import aiohttp

from loadgen import stats
from loadgen.stats import Stats

DEFAULT_PROMPT = "请简要介绍人工智能的发展历史"
ROOT_ENDPOINT = "/"
OPENAI_ENDPOINT = "/v1/completions"
CHAT_ENDPOINT = "/v1/chat/completions"
ENDPOINTS = (ROOT_ENDPOINT, OPENAI_ENDPOINT, CHAT_ENDPOINT)
# The header a conversation's turns carry (Ray Serve's own name for session affinity).
SESSION_HEADER = "x-session-id"
NODES_ENDPOINT = "/nodes"         # the service's own list of nodes holding its replicas
MODELS_ENDPOINT = "/v1/models"
# The replica's node on every response (the guide's POST / also has it in the body; vLLM's own
# /v1 answers only here).
NODE_HEADER = "x-serve-node"
UNKNOWN_NODE = "unknown"
CONNECTION_ERROR = "connection_error"

# A stream chunk, or an error body, can exceed aiohttp's 64 KiB line buffer with long outputs.
_READ_BUFSIZE = 1 << 20
# Only the socket connect gets this bound: aiohttp's `connect` timeout would also count the wait
# for a free pooled connection, which is the load test's own queueing, not the server's fault.
_SOCK_CONNECT_TIMEOUT_S = 30.0
_ERROR_MESSAGE_CHARS = 300


@dataclass(slots=True)
class LoadConfig:
    """What load to generate and against which service."""

    url: str = "http://localhost:8000"
    endpoint: str = ROOT_ENDPOINT
    prompts: Sequence[str] = (DEFAULT_PROMPT,)
    max_tokens: int = 128
    concurrency: int = 20
    num_requests: int = 100          # 0: no count limit (then `duration` must bound the run)
    request_rate: float = math.inf   # requests/s with Poisson arrivals; inf: closed loop
    duration: float | None = None    # stop issuing new requests after this many seconds
    timeout: float = 600.0           # per request, whole request including the streamed body
    stream: bool = False
    model: str = "DeepSeek-R1"       # sent on /v1/completions only
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    seed: int | None = None
    progress: bool = False
    expected_nodes: int | None = None
    # Multi-turn chat (on /v1/chat/completions): `conversations` conversations of `turns` turns,
    # each turn carrying the whole history, every turn of one conversation sent with the same
    # x-session-id header; all conversations interleaved. 0: independent requests.
    conversations: int = 0
    turns: int = 1
    system_prompt: str = ""          # a prefix every chat request shares (its first message)
    session_header: bool = True      # the turns name their conversation in SESSION_HEADER

    def target_url(self) -> str:
        return self.url.rstrip("/") + self.endpoint

    def public_dict(self) -> dict[str, Any]:
        """Parameters for reports: the API key redacted, prompts summarised (the list can be huge)."""
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        prompts = list(self.prompts)
        data["prompts"] = {"count": len(prompts), "first": prompts[0] if prompts else None}
        data["system_prompt"] = {"chars": len(self.system_prompt),
                                 "words": len(self.system_prompt.split())}
        data["request_rate"] = None if math.isinf(self.request_rate) else self.request_rate
        data["target_url"] = self.target_url()
        return data


@dataclass(slots=True)
class RequestResult:
    """One request's outcome; failures are data (`error` holds a kind such as 'http_503')."""

    index: int
    start: float                      # seconds since the run started
    latency: float = 0.0              # seconds from send to the last byte (or the failure)
    ok: bool = False
    status: int = 0                   # HTTP status; 0 when no response arrived
    error: str | None = None
    message: str = ""
    node: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False      # False: output_tokens counted from stream chunks (or unknown)
    finish_reason: str | None = None
    ttft: float | None = None         # streaming only
    itl: list[float] | None = None    # streaming only: gaps between content chunks
    # Streamed chats of a reasoning model (reasoning deltas before the answer's): time to the
    # first answer chunk, and the chunks (about a token each) of thinking and of answer.
    ttfa: float | None = None
    reasoning_chunks: int = 0
    answer_chunks: int = 0
    conversation: int | None = None   # multi-turn runs: which conversation, which turn (from 0)
    turn: int | None = None
    answer: str | None = None         # multi-turn runs, until the next turn carries it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class LoadResult:
    """Everything a run produced: the config, every request's result and the run's timing."""

    config: LoadConfig
    results: list[RequestResult]
    duration: float                   # first send to last completion, seconds
    started_at: float                 # wall-clock epoch seconds
    aborted: str | None = None        # why issuing stopped early, if it did
    event_loop: str = "asyncio"
    # Nodes that hold the service's replicas, as the service reports them (GET /nodes); None when
    # it does not say. Nodes here that answered nothing show up in the summary with 0 answers.
    replica_nodes: list[str] | None = None
    # What the service said about itself after the run (see fetch_server_info).
    server: dict[str, Any] | None = None


@dataclass(slots=True)
class NodeStats:
    node: str
    count: int
    share: float
    latency: Stats


@dataclass(slots=True)
class TurnStats:
    turn: int                         # from 0
    count: int
    first_token: Stats                # TTFT when streaming, else the end-to-end latency


@dataclass(slots=True)
class ConversationStats:
    """A multi-turn run: how many conversations finished, whether each stayed on one node (a
    replica's prefix cache holds its history only there), and how the turns' waits grow."""

    conversations: int
    turns: int
    completed: int                    # every turn answered
    multi_turn: int                   # at least two turns answered
    one_node: int                     # ... and all of them by one node
    by_turn: list[TurnStats]

    @property
    def one_node_share(self) -> float | None:
        return self.one_node / self.multi_turn if self.multi_turn else None


def conversation_stats(results: Sequence[RequestResult], turns: int,
                       stream: bool) -> ConversationStats | None:
    """The multi-turn figures of a run (None when it had no conversations)."""
    by_conversation: dict[int, list[RequestResult]] = {}
    for r in results:
        if r.conversation is not None:
            by_conversation.setdefault(r.conversation, []).append(r)
    if not by_conversation:
        return None
    answered = {c: [r for r in rs if r.ok] for c, rs in by_conversation.items()}
    multi = [rs for rs in answered.values() if len(rs) >= 2]
    one_node = sum(1 for rs in multi if len({r.node for r in rs}) == 1)
    by_turn = []
    for turn in range(turns):
        waits = [(r.ttft if stream else r.latency) for rs in answered.values() for r in rs
                 if r.turn == turn]
        values = [w for w in waits if w is not None]
        by_turn.append(TurnStats(turn, len(values), stats.describe(values)))
    return ConversationStats(len(by_conversation), turns,
                             sum(1 for rs in answered.values() if len(rs) == turns),
                             len(multi), one_node, by_turn)


@dataclass(slots=True)
class Summary:
    """Aggregates of a run, shaped like `vllm bench serve`'s report plus per-node figures."""

    answered: int                     # requests with an outcome: successes + failures
    successes: int
    failures: int
    error_kinds: dict[str, int]
    duration: float
    request_throughput: float         # successful requests / s
    output_token_throughput: float
    total_token_throughput: float
    total_prompt_tokens: int
    total_output_tokens: int
    latency: Stats
    ttft: Stats | None
    tpot: Stats | None
    itl: Stats | None
    nodes: list[NodeStats]
    balance: float | None             # min share / max share over nodes, see stats.balance
    max_share_deviation: float | None
    expected_nodes: int | None
    aborted: str | None = None
    sample_errors: dict[str, str] = field(default_factory=dict)
    conversation: ConversationStats | None = None
    # Streamed answers of a reasoning model: time to the first answer chunk (after thinking),
    # and the chunks of thinking and of answer over the run (None: no request reasoned).
    ttfa: Stats | None = None
    reasoning_chunks: int | None = None
    answer_chunks: int | None = None

    @property
    def node_counts(self) -> dict[str, int]:
        return {entry.node: entry.count for entry in self.nodes}

    @property
    def unreachable(self) -> bool:
        """True when nothing ever answered: every request failed to connect."""
        return self.answered > 0 and self.error_kinds.get(CONNECTION_ERROR, 0) == self.answered

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["node_counts"] = self.node_counts
        return data


# ---------------------------------------------------------------------------------------------
# Request building and the HTTP client


def build_payloads(config: LoadConfig) -> list[bytes]:
    """One encoded body per distinct prompt, so the hot loop only picks bytes, never serialises."""
    return [json.dumps(request_body(config, prompt), ensure_ascii=False).encode()
            for prompt in config.prompts]


def chat_messages(config: LoadConfig, user_turns: Sequence[str],
                  answers: Sequence[str] = ()) -> list[dict[str, str]]:
    """A chat request's messages: the shared system prompt, then each earlier turn's question
    and answer, then the newest question."""
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    for question, answer in zip(user_turns, answers):
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user_turns[len(answers)]})
    return messages


def request_body(config: LoadConfig, prompt: str,
                 messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """One request's JSON body for the configured endpoint."""
    body: dict[str, Any]
    if config.endpoint == CHAT_ENDPOINT:
        body = {"messages": messages or chat_messages(config, [prompt])}
    else:
        body = {"prompt": prompt}
    body["max_tokens"] = config.max_tokens
    if config.endpoint != ROOT_ENDPOINT:
        body["model"] = config.model
    if config.stream:
        body["stream"] = True
        if config.endpoint != ROOT_ENDPOINT:
            body["stream_options"] = {"include_usage": True}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


_SYSTEM_SENTENCE = ("Rule {n}: answer the question asked, in plain words, and say so when you "
                    "are not sure. ")


def system_prompt_text(words: int) -> str:
    """A deterministic system prompt of about `words` words ("" for 0): numbered rules, so
    that no two sentences are the same."""
    if words <= 0:
        return ""
    sentences, count, n = [], 0, 1
    per_sentence = len(_SYSTEM_SENTENCE.split())
    while count < words:
        sentences.append(_SYSTEM_SENTENCE.format(n=n))
        count += per_sentence
        n += 1
    return "".join(sentences).strip()


def conversation_turn(config: LoadConfig, conversation: int, turn: int) -> str:
    """The question of a conversation's turn: the prompts in turn, each conversation starting
    at its own place."""
    prompts = config.prompts
    return prompts[(conversation + turn) % len(prompts)]


def build_headers(config: LoadConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if config.stream:
        headers["Accept"] = "text/event-stream"
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message", error) if isinstance(error, dict) else error
        text = str(message)
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace")
    return text.strip()[:_ERROR_MESSAGE_CHARS]


def _apply_usage(result: RequestResult, usage: Any) -> None:
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.usage_reported = True


def _parse_json_body(result: RequestResult, body: bytes, keep_answer: bool = False) -> None:
    data = json.loads(body)
    choice = data["choices"][0]
    if not isinstance(choice.get("text", ""), str):
        raise ValueError("choices[0].text is not a string")
    if keep_answer:
        message = choice.get("message") or {}
        result.answer = message.get("content") or choice.get("text") or ""
    result.finish_reason = choice.get("finish_reason")
    result.node = data.get("node") or result.node or UNKNOWN_NODE
    _apply_usage(result, data.get("usage"))
    result.ok = True


async def _read_stream(result: RequestResult, response: aiohttp.ClientResponse, sent_at: float,
                       keep_answer: bool = False) -> None:
    perf = time.perf_counter
    itl: list[float] = []
    result.itl = itl
    content_chunks = 0
    last_chunk_at = 0.0
    answer: list[str] = []
    done = False
    node = None
    async for raw_line in response.content:
        line = raw_line.strip()
        # SSE: blank lines separate events, ':' lines are comments; only data lines matter here.
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue  # keep reading to EOF so the keep-alive connection goes back to the pool
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = "stream_error"
            result.message = _error_message(data)
            continue
        node = chunk.get("node") or node
        choices = chunk.get("choices")
        if choices:
            # Like `vllm bench serve`, every chunk with choices counts for TTFT/ITL even when its
            # text is empty (special tokens), so the two tools' figures compare directly.
            choice = choices[0]
            now = perf() - sent_at
            if result.ttft is None:
                result.ttft = now
            else:
                itl.append(now - last_chunk_at)
            last_chunk_at = now
            if choice.get("text"):
                content_chunks += 1
            delta = choice.get("delta") or {}
            if delta.get("reasoning") or delta.get("reasoning_content"):
                result.reasoning_chunks += 1
            if choice.get("text") or delta.get("content"):
                result.answer_chunks += 1
                if result.ttfa is None:
                    result.ttfa = now
            if keep_answer:
                answer.append(choice.get("text") or (choice.get("delta") or {}).get("content")
                              or "")
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            _apply_usage(result, usage)
    result.node = node or result.node or UNKNOWN_NODE
    if result.error is not None:
        return
    if not done:
        result.error = "invalid_response"
        result.message = "event stream ended without 'data: [DONE]'"
        return
    if not result.usage_reported:
        result.output_tokens = content_chunks
    if keep_answer:
        result.answer = "".join(answer)
    result.ok = True


async def send_request(session: aiohttp.ClientSession, url: str, payload: bytes,
                       headers: dict[str, str], stream: bool, index: int,
                       run_started: float, keep_answer: bool = False) -> RequestResult:
    """Send one request; never raises for request failures, they come back as the result's
    `error`. `keep_answer`: the answer's text in `answer` (a conversation's next turn needs it)."""
    sent_at = time.perf_counter()
    result = RequestResult(index=index, start=sent_at - run_started)
    try:
        async with session.post(url, data=payload, headers=headers) as response:
            result.status = response.status
            result.node = response.headers.get(NODE_HEADER)
            if response.status != 200:
                body = await response.read()
                result.error = f"http_{response.status}"
                result.message = _error_message(body)
            elif stream:
                await _read_stream(result, response, sent_at, keep_answer)
            else:
                _parse_json_body(result, await response.read(), keep_answer)
    except asyncio.TimeoutError as exc:  # before ClientError: ServerTimeoutError is both
        result.error = "connect_timeout" if "connect" in type(exc).__name__.lower() else "timeout"
        result.message = str(exc) or type(exc).__name__
    except aiohttp.ClientConnectorError as exc:
        result.error = CONNECTION_ERROR
        result.message = str(exc)
    except aiohttp.ServerDisconnectedError as exc:
        result.error = "server_disconnected"
        result.message = str(exc) or "server disconnected"
    except aiohttp.ClientPayloadError as exc:
        result.error = "payload_error"
        result.message = str(exc)
    except aiohttp.ClientError as exc:
        result.error = "client_error"
        result.message = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        result.error = "invalid_response"
        result.message = f"{type(exc).__name__}: {exc}"[:_ERROR_MESSAGE_CHARS]
    except Exception as exc:  # noqa: BLE001 - a load test records every failure instead of dying
        result.error = f"error_{type(exc).__name__}"
        result.message = str(exc)[:_ERROR_MESSAGE_CHARS]
    result.latency = time.perf_counter() - sent_at
    if result.error is not None:
        result.ok = False
    return result


# ---------------------------------------------------------------------------------------------
# The load loops


class _Run:
    """State shared by the workers of one run; single-threaded (asyncio), so no locks."""

    def __init__(self, config: LoadConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.url = config.target_url()
        self.payloads = build_payloads(config)
        self.headers = build_headers(config)
        self.results: list[RequestResult] = []
        self.next_index = 0
        self.failures = 0
        self.answered = 0             # requests that got any HTTP response
        self.connection_errors = 0
        self.aborted: str | None = None
        self.started = time.perf_counter()
        self.deadline = (self.started + config.duration) if config.duration else math.inf
        limit = config.num_requests if config.num_requests > 0 else math.inf
        if config.conversations:
            limit = config.conversations * config.turns
        self.limit = limit
        # "Unreachable from the start": the first wave of requests all failed to connect.
        self.abort_after = int(min(limit, max(config.concurrency, 3)))

    def claim(self) -> int | None:
        """The next request's index, or None once the count, the duration or an abort says stop."""
        if self.aborted is not None or self.next_index >= self.limit:
            return None
        if time.perf_counter() >= self.deadline:
            return None
        index = self.next_index
        self.next_index += 1
        return index

    async def one(self, index: int, payload: bytes | None = None,
                  headers: dict[str, str] | None = None,
                  keep_answer: bool = False) -> RequestResult:
        payloads = self.payloads
        result = await send_request(self.session, self.url,
                                    payload or payloads[index % len(payloads)],
                                    headers or self.headers, self.config.stream, index,
                                    self.started, keep_answer)
        self.results.append(result)
        self._count(result)
        return result

    def _count(self, result: RequestResult) -> None:
        if result.ok:
            self.answered += 1
            return
        self.failures += 1
        if result.status:
            self.answered += 1
        elif result.error == CONNECTION_ERROR:
            self.connection_errors += 1
            if self.answered == 0 and self.connection_errors >= self.abort_after:
                self.aborted = f"{CONNECTION_ERROR}: {result.message}"

    async def conversation_loop(self) -> None:
        """Every conversation's turns in order, each after the previous turn's answer; at most
        `concurrency` requests in flight, the next turns of all conversations served in the
        order they became ready (so conversations interleave). A failed turn ends its
        conversation."""
        config = self.config
        ready: asyncio.Queue[tuple[int, int, list[str], list[str]] | None] = asyncio.Queue()
        for conversation in range(config.conversations):
            ready.put_nowait((conversation, 0, [], []))
        open_conversations = config.conversations
        workers = min(config.concurrency, config.conversations)

        def close_one() -> None:
            nonlocal open_conversations
            open_conversations -= 1
            if open_conversations == 0:
                for _ in range(workers):
                    ready.put_nowait(None)

        async def worker() -> None:
            while (item := await ready.get()) is not None:
                conversation, turn, questions, answers = item
                index = self.claim()
                if index is None:
                    close_one()
                    continue
                questions = questions + [conversation_turn(config, conversation, turn)]
                body = request_body(config, questions[-1],
                                    chat_messages(config, questions, answers))
                headers = {**self.headers, SESSION_HEADER: f"conversation-{conversation}"} \
                    if config.session_header else self.headers
                result = await self.one(index, json.dumps(body, ensure_ascii=False).encode(),
                                        headers, keep_answer=True)
                result.conversation, result.turn = conversation, turn
                answer, result.answer = result.answer, None
                if result.ok and turn + 1 < config.turns:
                    ready.put_nowait((conversation, turn + 1, questions,
                                      answers + [answer or ""]))
                else:
                    close_one()

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def closed_loop(self) -> None:
        async def worker() -> None:
            while (index := self.claim()) is not None:
                await self.one(index)

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))

    async def poisson_loop(self) -> None:
        """Poisson arrivals at `request_rate`, still never more than `concurrency` in flight.

        When the cap is hit the next arrival waits for a free slot (as `vllm bench serve
        --max-concurrency` does), so the offered rate is an upper bound, not a promise.
        """
        rng = random.Random(self.config.seed)
        slots = asyncio.Semaphore(self.config.concurrency)
        in_flight: set[asyncio.Task[RequestResult]] = set()
        next_arrival = time.perf_counter()

        def finished(task: asyncio.Task[RequestResult]) -> None:
            in_flight.discard(task)
            slots.release()

        while True:
            delay = next_arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            index = self.claim()
            if index is None:
                slots.release()
                break
            task = asyncio.create_task(self.one(index))
            in_flight.add(task)
            task.add_done_callback(finished)
            next_arrival += rng.expovariate(self.config.request_rate)
        if in_flight:
            await asyncio.gather(*in_flight)


class ProgressBar:
    """Progress on a stream (stderr): a redrawn bar on a TTY, plain periodic lines otherwise."""

    def __init__(self, run: _Run, stream: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.run = run
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Logs (CI, `| tee`) must not fill up with redraws: far fewer lines when not a TTY.
        self.interval = interval if interval is not None else (0.25 if self.tty else 5.0)

    def line(self) -> str:
        run = self.run
        done = len(run.results)
        elapsed = time.perf_counter() - run.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if math.isfinite(run.limit):
            total = int(run.limit)
            fraction = done / total if total else 1.0
            head = f"{done}/{total} {fraction * 100:5.1f}%"
        elif math.isfinite(run.deadline):
            fraction = min(1.0, elapsed / run.config.duration) if run.config.duration else 1.0
            head = f"{done} done, {elapsed:.0f}/{run.config.duration:.0f}s"
        else:
            fraction, head = 0.0, f"{done} done"
        in_flight = run.next_index - done
        text = (f"{head} | {rate:8.1f} req/s | in flight {in_flight} | failed {run.failures}"
                f" | {elapsed:6.1f}s")
        if self.tty:
            width = 24
            filled = int(width * fraction)
            return f"[{'#' * filled}{'.' * (width - filled)}] {text}"
        return f"progress: {text}"

    def draw(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    async def follow(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.draw()
        except asyncio.CancelledError:
            self.draw(final=True)
            raise


async def run_load(config: LoadConfig, progress_stream: TextIO | None = None,
                   describe_server: bool = False) -> LoadResult:
    """Drive the service with `config` and return every request's result; failures are data.
    `describe_server` also asks for GET /v1/models after the run (the HTML report shows it)."""
    validate_config(config)
    connector = aiohttp.TCPConnector(limit=config.concurrency, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=config.timeout,
                                    sock_connect=min(config.timeout, _SOCK_CONNECT_TIMEOUT_S))
    # trust_env=False: a proxy from the environment must never sit between us and the service.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     read_bufsize=_READ_BUFSIZE, raise_for_status=False) as session:
        started_at = time.time()
        run = _Run(config, session)
        progress_task = None
        if config.progress:
            progress_task = asyncio.create_task(ProgressBar(run, progress_stream).follow())
        try:
            if config.conversations:
                await run.conversation_loop()
            elif math.isinf(config.request_rate):
                await run.closed_loop()
            else:
                await run.poisson_loop()
        finally:
            duration = time.perf_counter() - run.started
            if progress_task is not None:
                progress_task.cancel()
                try:
                    await progress_task
                except asyncio.CancelledError:
                    pass
        server = await fetch_server_info(session, config, models=describe_server)
    run.results.sort(key=lambda result: result.index)
    replica_nodes = replica_nodes_of(server)
    return LoadResult(config=config, results=run.results, duration=duration,
                      started_at=started_at, aborted=run.aborted,
                      event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                      replica_nodes=None if replica_nodes is None else sorted(replica_nodes),
                      server=server)


async def _get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    """A GET's JSON body, or None when the service does not answer it with 200 and JSON."""
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                return None
            return await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def fetch_server_info(session: aiohttp.ClientSession, config: LoadConfig,
                            models: bool = False) -> dict[str, Any]:
    """What the service says about itself over HTTP: its `GET /nodes` (the answering replica's
    status and engine layout, and the nodes holding replicas) and, with `models`,
    `GET /v1/models`; a key is None when the service does not answer (or was not asked).
    Asked after the run, so that replicas added by autoscaling count."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    base = config.url.rstrip("/")
    nodes = await _get_json(session, base + NODES_ENDPOINT, headers)
    listed = await _get_json(session, base + MODELS_ENDPOINT, headers) if models else None
    return {"nodes": nodes if isinstance(nodes, dict) else None,
            "models": listed if isinstance(listed, dict) else None}


def replica_nodes_of(server: dict[str, Any] | None) -> dict[str, int] | None:
    """Node ID -> replicas there, from the service's `GET /nodes`; None when it does not say."""
    nodes = ((server or {}).get("nodes") or {}).get("replica_nodes")
    if isinstance(nodes, dict):
        return {str(node): int(count) if isinstance(count, (int, float)) else 0
                for node, count in sorted(nodes.items())}
    if isinstance(nodes, list):
        return {str(node): 1 for node in sorted(nodes)}
    return None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (Ray Serve's uvicorn brings it): about 25% more requests/s per core."""
    if os.environ.get("DEEPSEEK_SERVE_LOADGEN_NO_UVLOOP"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_load_sync(config: LoadConfig, progress_stream: TextIO | None = None,
                  describe_server: bool = False) -> LoadResult:
    """run_load from synchronous code, on uvloop when available."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_load(config, progress_stream, describe_server))


def validate_config(config: LoadConfig) -> None:
    """Raise ValueError for a config that cannot describe a run."""
    if config.concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if config.num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if config.num_requests == 0 and not config.duration:
        raise ValueError("num_requests 0 (no limit) needs a duration")
    if config.duration is not None and config.duration <= 0:
        raise ValueError("duration must be positive")
    if not config.request_rate > 0:
        raise ValueError("request_rate must be positive (inf for a closed loop)")
    if not config.timeout > 0:
        raise ValueError("timeout must be positive")
    if config.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if config.endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
    if not config.prompts:
        raise ValueError("at least one prompt is needed")
    if config.conversations < 0 or config.turns < 1:
        raise ValueError("conversations must be >= 0 and turns >= 1")
    if config.conversations and config.endpoint != CHAT_ENDPOINT:
        raise ValueError(f"conversations are chats: the endpoint must be {CHAT_ENDPOINT}")
    if config.conversations and not math.isinf(config.request_rate):
        raise ValueError("conversations run as a closed loop (each turn after its answer): "
                         "no request rate")


# ---------------------------------------------------------------------------------------------
# Summaries and reports


def summarize(result: LoadResult) -> Summary:
    """Aggregate a run's results into throughputs, latency distributions and per-node figures."""
    successes = [r for r in result.results if r.ok]
    failures = [r for r in result.results if not r.ok]
    error_kinds: dict[str, int] = {}
    sample_errors: dict[str, str] = {}
    for failure in failures:
        kind = failure.error or "unknown_error"
        error_kinds[kind] = error_kinds.get(kind, 0) + 1
        sample_errors.setdefault(kind, failure.message)
    error_kinds = dict(sorted(error_kinds.items(), key=lambda item: (-item[1], item[0])))

    prompt_tokens = sum(r.prompt_tokens for r in successes)
    output_tokens = sum(r.output_tokens for r in successes)
    duration = result.duration

    ttft = tpot = itl = ttfa = None
    reasoning = answer = None
    if result.config.stream:
        if any(r.reasoning_chunks for r in successes):
            ttfa = stats.describe([r.ttfa for r in successes if r.ttfa is not None])
            reasoning = sum(r.reasoning_chunks for r in successes)
            answer = sum(r.answer_chunks for r in successes)
        ttft = stats.describe([r.ttft for r in successes if r.ttft is not None])
        tpots = [stats.tpot(r.latency, r.ttft, r.output_tokens) for r in successes]
        tpot = stats.describe([value for value in tpots if value is not None])
        itl = stats.describe([gap for r in successes if r.itl for gap in r.itl])

    latencies_by_node: dict[str, list[float]] = {}
    for r in successes:
        latencies_by_node.setdefault(r.node or UNKNOWN_NODE, []).append(r.latency)
    counts = {node: len(values) for node, values in latencies_by_node.items()}
    # Replica nodes that answered nothing count as zero: one busy node of two is no balance.
    for node in result.replica_nodes or ():
        counts.setdefault(node, 0)
    shares = stats.shares(counts)
    nodes = [NodeStats(node=node, count=counts[node], share=shares[node],
                       latency=stats.describe(latencies_by_node.get(node, [])))
             for node in sorted(counts, key=lambda name: (-counts[name], name))]

    expected = result.config.expected_nodes
    return Summary(
        answered=len(result.results),
        successes=len(successes),
        failures=len(failures),
        error_kinds=error_kinds,
        duration=duration,
        request_throughput=stats.throughput(len(successes), duration),
        output_token_throughput=stats.throughput(output_tokens, duration),
        total_token_throughput=stats.throughput(prompt_tokens + output_tokens, duration),
        total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
        latency=stats.describe([r.latency for r in successes]),
        ttft=ttft,
        tpot=tpot,
        itl=itl,
        ttfa=ttfa,
        reasoning_chunks=reasoning,
        answer_chunks=answer,
        nodes=nodes,
        balance=stats.balance(counts, expected),
        max_share_deviation=stats.max_share_deviation(counts, expected),
        expected_nodes=expected,
        aborted=result.aborted,
        sample_errors=sample_errors,
        conversation=conversation_stats(result.results, result.config.turns,
                                        result.config.stream),
    )


_WIDTH = 56


def _row(label: str, value: Any) -> str:
    return f"{label + ':':<40}{value}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.2f}"


def _stats_rows(title: str, short: str, figures: Stats | None) -> list[str]:
    if figures is None:
        return []
    rows = [f"{(' ' + title + ' '):-^{_WIDTH}}"]
    if figures.count == 0:
        return rows + [_row(f"{short} (ms)", "n/a (no samples)")]
    rows.append(_row(f"Mean {short} (ms)", _ms(figures.mean)))
    for label, value in (("P50", figures.p50), ("P90", figures.p90), ("P99", figures.p99)):
        rows.append(_row(f"{label} {short} (ms)", _ms(value)))
    return rows


def _conversation_rows(figures: ConversationStats | None, stream: bool) -> list[str]:
    if figures is None:
        return []
    share = figures.one_node_share
    rows = [f"{' Conversations ':-^{_WIDTH}}",
            _row("Conversations x turns", f"{figures.conversations} x {figures.turns}"),
            _row("Every turn answered", figures.completed),
            _row("All turns on one node",
                 "n/a" if share is None
                 else f"{share * 100:.1f}% ({figures.one_node} of {figures.multi_turn})")]
    short = "TTFT" if stream else "E2EL"
    for entry in figures.by_turn:
        rows.append(_row(f"Turn {entry.turn + 1} P50 {short} (ms)",
                         f"{_ms(entry.first_token.p50)} ({entry.count} answered)"))
    return rows


def format_report(summary: Summary, config: LoadConfig) -> str:
    """The end-of-run table, laid out like `vllm bench serve`'s result block."""
    mode = ("closed loop" if math.isinf(config.request_rate)
            else f"Poisson {config.request_rate:g} req/s")
    lines = [f"{' Load Test Result ':=^{_WIDTH}}",
             _row("Target", config.target_url()),
             _row("Mode", f"{mode}, concurrency {config.concurrency}"
                          f"{', streaming' if config.stream else ''}"),
             _row("Successful requests", summary.successes),
             _row("Failed requests", summary.failures)]
    for kind, count in summary.error_kinds.items():
        lines.append(_row(f"  {kind}", count))
    if summary.aborted:
        lines.append(_row("Stopped early", summary.aborted[:60]))
    lines += [
        _row("Benchmark duration (s)", f"{summary.duration:.2f}"),
        _row("Total input tokens", summary.total_prompt_tokens),
        _row("Total generated tokens", summary.total_output_tokens),
        _row("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        _row("Output token throughput (tok/s)", f"{summary.output_token_throughput:.2f}"),
        _row("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
    ]
    lines += _stats_rows("End-to-end Latency", "E2EL", summary.latency)
    lines += _stats_rows("Time to First Token", "TTFT", summary.ttft)
    if summary.ttfa is not None:
        lines += _stats_rows("Time to First Answer Token (after reasoning)", "TTFA",
                             summary.ttfa)
        lines.append(_row("Reasoning / answer chunks", f"{summary.reasoning_chunks} / "
                                                       f"{summary.answer_chunks}"))
    lines += _stats_rows("Time per Output Token (excl. 1st token)", "TPOT", summary.tpot)
    lines += _stats_rows("Inter-token Latency", "ITL", summary.itl)
    lines += _conversation_rows(summary.conversation, config.stream)
    lines.append(f"{' Per-node distribution ':-^{_WIDTH}}")
    if summary.nodes:
        node_width = max(12, min(56, max(len(entry.node) for entry in summary.nodes)))
        lines.append(f"{'node':<{node_width}} {'count':>7} {'share':>7} "
                     f"{'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9}")
        for entry in summary.nodes:
            name = entry.node if len(entry.node) <= node_width else entry.node[:node_width - 1] + "~"
            lines.append(f"{name:<{node_width}} {entry.count:>7} {entry.share * 100:>6.1f}% "
                         f"{_ms(entry.latency.mean):>9} {_ms(entry.latency.p50):>9} "
                         f"{_ms(entry.latency.p99):>9}")
        seen = sum(1 for entry in summary.nodes if entry.count > 0)
        expected = f" of {summary.expected_nodes} expected" if summary.expected_nodes else ""
        balance = "n/a" if summary.balance is None else f"{summary.balance:.3f}"
        lines.append(_row("Nodes answering", f"{seen}{expected}"))
        lines.append(_row("Balance (min/max share, 1 = even)", balance))
        silent = [entry.node for entry in summary.nodes if entry.count == 0]
        if silent:
            lines.append(f"WARNING: nodes holding replicas answered nothing: {', '.join(silent)}")
        if summary.expected_nodes and seen < summary.expected_nodes:
            lines.append(f"WARNING: only {seen} of {summary.expected_nodes} expected nodes answered")
    else:
        lines.append("no successful answers")
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def environment_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count()}


def result_to_json(result: LoadResult, summary: Summary,
                   include_requests: bool = False) -> dict[str, Any]:
    """Everything a run produced, as JSON-ready data."""
    data: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(result.started_at)),
        "parameters": result.config.public_dict(),
        "environment": {**environment_info(), "event_loop": result.event_loop},
        "summary": summary.to_dict(),
        "nodes": [asdict(entry) for entry in summary.nodes],
        "errors": summary.error_kinds,
    }
    if include_requests:
        data["requests"] = [r.to_dict() for r in result.results]
    return data


def write_json(path: str, result: LoadResult, summary: Summary,
               include_requests: bool = False, extra: dict[str, Any] | None = None) -> None:
    data = {**result_to_json(result, summary, include_requests), **(extra or {})}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=2)
        handle.write("\n")


def load_prompts(path: str) -> list[str]:
    """Prompts from a file: one per line, or JSONL objects with a "prompt" field; blanks skipped."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.lstrip().startswith("{"):
                try:
                    record = json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: invalid JSON: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}:{number}: JSON line without a string 'prompt'")
                prompts.append(record["prompt"])
            else:
                prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
