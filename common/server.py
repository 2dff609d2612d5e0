"""The replica: one vLLM engine behind the project's HTTP API (guide's POST /, OpenAI /v1, /health)."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from common import api, reasoning
from common.api import ApiError, Generation, RawRequest, ResponseContext, Result
from common.config import EngineConfig, ServeConfig

logger = logging.getLogger("ray.serve")

Handler = Callable[[RawRequest, str], Awaitable[Result]]


def serve_request_id() -> str | None:
    """Serve's ID of the current request: the client's X-Request-Id when it sent one, and what
    Serve's proxy returns in the X-Request-Id response header and writes in its access logs."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a Serve request (unit tests)
        return None


_REPLICA_NODES_TTL_S = 5.0
_replica_nodes_cache: tuple[float, dict[str, int]] = (0.0, {})


def app_replica_nodes() -> dict[str, int]:
    """Node ID -> RUNNING engine replicas of the current Serve application, from Serve's
    controller (cached a few seconds: load tests may ask often). Routers hold no engine."""
    global _replica_nodes_cache
    cached_at, nodes = _replica_nodes_cache
    if time.monotonic() - cached_at < _REPLICA_NODES_TTL_S:
        return nodes
    from ray import serve
    from ray.serve.context import _get_global_client

    app_name = serve.get_replica_context().app_name
    details = _get_global_client().get_serve_details() or {}
    app = (details.get("applications") or {}).get(app_name) or {}
    nodes = {}
    for name, deployment in (app.get("deployments") or {}).items():
        if name == ROUTER_DEPLOYMENT:
            continue
        for replica in deployment.get("replicas") or []:
            state = str(getattr(replica.get("state"), "value", replica.get("state")))
            if state == "RUNNING" and replica.get("node_id"):
                nodes[replica["node_id"]] = nodes.get(replica["node_id"], 0) + 1
    _replica_nodes_cache = (time.monotonic(), nodes)
    return nodes


# The placement-group application's round-robin router (common/ingress.py): it holds no engine.
ROUTER_DEPLOYMENT = "Router"


class LLMServer:
    """Transport-neutral API over one engine; `LLMDeployment` puts it behind HTTP."""

    def __init__(self, engine_config: EngineConfig, serve_config: ServeConfig):
        import ray

        from common.engine import build_engine, serve_log_handlers_kept

        self.engine_config = engine_config
        self.serve_config = serve_config
        self.model_name = engine_config.served_model_name
        self.node_id = ray.get_runtime_context().get_node_id()
        with serve_log_handlers_kept():
            self.engine = build_engine(engine_config)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self._tokenizer = None
        # DeepSeek-R1 reasoning split on /v1/chat/completions (POST / splits only on request).
        self.reasoning_on = reasoning.enabled(serve_config.reasoning_parser,
                                              engine_config.served_model_name, engine_config.model)
        self._markers_special: bool | None = None
        self.counters = {"running": 0, "finished": 0, "aborted": 0, "failed": 0}
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"POST": self._generate},
            "/v1/completions": {"POST": self._completions},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/nodes": {"GET": self._nodes},
        }
        logger.info("replica ready on node %s: model %s, context %d tokens",
                    self.node_id, self.model_name, self.max_model_len)

    # ---- entry points -------------------------------------------------------------------------

    async def respond(self, raw: RawRequest) -> Result:
        request_id = api.new_request_id(serve_request_id() or raw.headers.get("x-request-id"))
        try:
            handler = self._route(raw)
            if raw.path != "/health":
                self._authorize(raw)
            result = await handler(raw, request_id)
        except ApiError as err:
            if err.status >= 500:
                logger.warning("request %s: %s", request_id, err.message)
            return api.error_result(err)
        return result

    async def call(self, raw: RawRequest) -> AsyncIterator[Any]:
        """For routers calling through a DeploymentHandle (stream=True): first the status and
        headers, then the body in one or more byte chunks."""
        result = await self.respond(raw)
        yield {"status": result.status, "headers": result.headers}
        if result.stream is None:
            yield result.body
        else:
            async for chunk in result.stream:
                yield chunk

    async def healthy(self) -> bool:
        return not self.engine.errored

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine is dead: {self.engine.dead_error}")

    # ---- routing and auth ----------------------------------------------------------------------

    def _route(self, raw: RawRequest) -> Handler:
        methods = self.routes.get(raw.path.rstrip("/") or "/")
        if methods is None:
            raise ApiError(404, f"no route {raw.path}; see POST /, POST /v1/completions, GET /nodes, "
                                f"POST /v1/chat/completions, GET /v1/models, GET /health")
        handler = methods.get(raw.method.upper())
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise ApiError(405, f"{raw.method} is not allowed on {raw.path}; use {allowed}",
                           headers={"allow": allowed})
        return handler

    def _authorize(self, raw: RawRequest) -> None:
        key = self.serve_config.api_key
        if not key:
            return
        given = raw.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type_="authentication_error", headers={"www-authenticate": "Bearer"})

    # ---- endpoints -----------------------------------------------------------------------------

    async def _health(self, raw: RawRequest, request_id: str) -> Result:
        from common.engine import unfinished_requests

        alive = not self.engine.errored
        body = {"status": "ok" if alive else "engine_dead", "node": self.node_id,
                "model": self.model_name, "engine_unfinished_requests":
                    unfinished_requests(self.engine), **self.counters}
        return Result(status=200 if alive else 503, body=api.dumps(body))

    async def _nodes(self, raw: RawRequest, request_id: str) -> Result:
        """The nodes holding this application's engine replicas, so that a plain HTTP client
        (load_test.py) can tell a node that answered nothing from one that does not exist."""
        nodes = await asyncio.to_thread(app_replica_nodes)
        return Result(body=api.dumps({"node": self.node_id, "replica_nodes": nodes}))

    async def _models(self, raw: RawRequest, request_id: str) -> Result:
        body = {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "ray-vllm",
            "max_model_len": self.max_model_len}]}
        return Result(body=api.dumps(body))

    async def _generate(self, raw: RawRequest, request_id: str) -> Result:
        req = api.parse_body(raw.body, api.GenerateRequest, self.serve_config.max_body_bytes)
        ids = await self._encode(req.prompt, add_special_tokens=True)
        return await self._run(request_id, ids, req, req.max_tokens, "completion", "inline",
                               split=req.split_reasoning)

    async def _completions(self, raw: RawRequest, request_id: str) -> Result:
        req = api.parse_body(raw.body, api.CompletionRequest, self.serve_config.max_body_bytes)
        self._check_model(req.model)
        ids = await self._encode(req.prompt, add_special_tokens=True)
        return await self._run(request_id, ids, req, req.max_tokens, "completion",
                               self._openai_usage(req))

    async def _chat(self, raw: RawRequest, request_id: str) -> Result:
        req = api.parse_body(raw.body, api.ChatRequest, self.serve_config.max_body_bytes)
        self._check_model(req.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as exc:
            raise ApiError(400, f"messages: {exc}") from None
        tokenizer = await self._get_tokenizer()
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=True)
        except Exception as exc:  # templates raise whatever jinja raises
            raise ApiError(400, f"messages cannot be rendered by the chat template: {exc}") \
                from None
        ids = await self._encode(prompt, add_special_tokens=False)
        budget = req.token_budget(default=max(1, self.max_model_len - len(ids)))
        return await self._run("chatcmpl-" + request_id.split("-", 1)[-1], ids, req, budget,
                               "chat", self._openai_usage(req), split=self.reasoning_on)

    @staticmethod
    def _openai_usage(req: api.OpenAIFields) -> str:
        """OpenAI streams carry usage in a separate last chunk, only when asked for."""
        return "separate" if req.stream_options and req.stream_options.include_usage else "none"

    # ---- engine --------------------------------------------------------------------------------

    async def _get_tokenizer(self):
        if self._tokenizer is None:
            tokenizer = self.engine.get_tokenizer()
            if inspect.isawaitable(tokenizer):  # a coroutine in some vLLM releases
                tokenizer = await tokenizer
            self._tokenizer = tokenizer
        return self._tokenizer

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        tokenizer = await self._get_tokenizer()
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this service serves "
                                f"{self.model_name!r} (see GET /v1/models)",
                           code="model_not_found")

    async def _think_markers_are_special(self) -> bool:
        """Whether this tokenizer marks <think>/</think> as special tokens. Detokenizing skips
        special tokens, so the split then needs them kept in the text. DeepSeek-R1's tokenizer
        has them as ordinary added tokens; the demo model's has them special."""
        if self._markers_special is None:
            tokenizer = await self._get_tokenizer()
            special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
            self._markers_special = reasoning.THINK_END in special
        return self._markers_special

    def _sampling_params(self, req: api.SamplingFields, max_tokens: int, stream: bool,
                         keep_special_tokens: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": req.ignore_eos}
        if keep_special_tokens:
            kwargs["skip_special_tokens"] = False
        for name in ("temperature", "top_p", "seed", "stop"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        # Non-streaming requests want only the final output: building and shipping a
        # RequestOutput per step for them cost about 16% of throughput on an H100.
        kwargs["output_kind"] = RequestOutputKind.DELTA if stream else \
            RequestOutputKind.FINAL_ONLY
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, f"invalid sampling parameters: {exc}") from None

    async def _run(self, request_id: str, ids: list[int], req: api.SamplingFields,
                   max_tokens: int, kind: str, usage_mode: str, split: bool = False) -> Result:
        """Generate for one request. kind: completion | chat. usage_mode (streams only):
        inline (usage in the last chunk, the guide's POST /), separate, or none. split: route
        <think>...</think> to reasoning_content (common/reasoning.py)."""
        prompt_tokens = len(ids)
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ApiError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                                f"{prompt_tokens + max_tokens} exceeds the model's context length "
                                f"({self.max_model_len}); shorten the prompt or lower max_tokens",
                           code="context_length_exceeded")
        if self.engine.errored:
            raise api.unavailable("the engine of this replica is dead; Serve is replacing it")
        keep_special = split and await self._think_markers_are_special()
        params = self._sampling_params(req, max_tokens, req.stream, keep_special)
        ctx = ResponseContext(request_id=request_id, model=self.model_name, node=self.node_id)
        # vLLM refuses duplicate request IDs; a client may reuse its X-Request-Id.
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        outputs = self.engine.generate({"prompt_token_ids": ids}, params, engine_id)
        if req.stream:
            stream = self._stream(ctx, outputs, prompt_tokens, kind, usage_mode, split)
            return Result(headers=dict(api.SSE_HEADERS), stream=stream)
        gen = await self._collect(ctx, outputs, prompt_tokens, split)
        body = api.completion_body(ctx, gen) if kind == "completion" else api.chat_body(ctx, gen)
        return Result(body=api.dumps(body))

    async def _collect(self, ctx: ResponseContext, outputs, prompt_tokens: int,
                       split: bool = False) -> Generation:
        started = time.perf_counter()
        self.counters["running"] += 1
        final = None
        try:
            async for final in outputs:
                pass
        except asyncio.CancelledError:
            # The client went away; vLLM's generator aborts the engine request on cancellation.
            self.counters["aborted"] += 1
            logger.info("request %s aborted: client disconnected", ctx.request_id)
            raise
        except Exception as exc:
            self.counters["failed"] += 1
            raise self._engine_error(ctx, exc) from None
        finally:
            self.counters["running"] -= 1
        self.counters["finished"] += 1
        out = final.outputs[0]
        gen = Generation(text=out.text, finish_reason=out.finish_reason,
                         prompt_tokens=prompt_tokens, completion_tokens=len(out.token_ids))
        if split:
            gen.reasoning, gen.text = reasoning.split(out.text)
        self._log_done(ctx, gen, time.perf_counter() - started)
        return gen

    async def _stream(self, ctx: ResponseContext, outputs, prompt_tokens: int, kind: str,
                      usage_mode: str, split: bool = False) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        completion_tokens = 0
        finish_reason = None
        text_parts: list[str] = []
        parser = reasoning.ReasoningParser() if split else None
        plain = api.SSEDeltaEncoder(ctx, kind)
        self.counters["running"] += 1
        try:
            first = True
            # vLLM's per-request collector already merges the deltas of steps this loop has not
            # picked up yet (RequestOutputCollector with DELTA), so each iteration sends
            # everything available at once and the first token is never held back.
            async for output in outputs:
                out = output.outputs[0]
                completion_tokens += len(out.token_ids)
                finish_reason = out.finish_reason
                if self.serve_config.log_prompts:
                    text_parts.append(out.text)
                text, thought = out.text, ""
                if parser is not None:
                    thought, text = parser.feed(out.text)
                    if finish_reason is not None:
                        tail_thought, tail_text = parser.finish()
                        thought, text = thought + tail_thought, text + tail_text
                    if not (thought or text or first or finish_reason is not None):
                        continue  # all held back (a marker may be arriving): nothing to send
                if finish_reason is None and not thought and not first:
                    # The common case, one frame per step: only the text is encoded (see
                    # api.SSEDeltaEncoder; same bytes as the general path below).
                    yield plain.frame(text)
                    continue
                if finish_reason is not None:
                    # The last output: its frame goes out with usage and [DONE] below (the
                    # generator ends after it; breaking would make vLLM abort the request).
                    continue
                if kind == "completion":
                    yield api.sse(api.completion_chunk(ctx, text, None, reasoning=thought))
                else:
                    delta = self._chat_delta(text, thought, first)
                    yield api.sse(api.chat_chunk(ctx, delta, None))
                first = False
            # One item for the end of the stream instead of two or three: every item costs a
            # trip through Serve (replica -> proxy), whose per-item cost is what made the
            # H100 stream bursty (ITL p50 0.03 ms / p99 56 ms vs vllm serve's 7.3 / 29 ms).
            tail: list[bytes] = []
            if finish_reason is not None:
                if kind == "completion":
                    usage = api.usage(prompt_tokens, completion_tokens) \
                        if usage_mode == "inline" else None
                    tail.append(api.sse(api.completion_chunk(ctx, text, finish_reason, usage,
                                                             reasoning=thought)))
                else:
                    delta = self._chat_delta(text, thought, first)
                    tail.append(api.sse(api.chat_chunk(ctx, delta, finish_reason)))
            if usage_mode == "separate":
                obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
                tail.append(api.sse(api.usage_chunk(ctx, obj, api.usage(prompt_tokens,
                                                                        completion_tokens))))
            tail.append(api.SSE_DONE)
            yield b"".join(tail)
            self.counters["finished"] += 1
            self._log_done(ctx, Generation("".join(text_parts), finish_reason, prompt_tokens,
                                           completion_tokens), time.perf_counter() - started)
        except (asyncio.CancelledError, GeneratorExit):
            self.counters["aborted"] += 1
            logger.info("stream %s aborted: client disconnected", ctx.request_id)
            raise
        except Exception as exc:
            self.counters["failed"] += 1
            err = self._engine_error(ctx, exc)
            yield api.sse(err.body()) + api.SSE_DONE
        finally:
            self.counters["running"] -= 1

    @staticmethod
    def _chat_delta(text: str, thought: str, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text}
        if thought:
            # Both names, as vLLM sends: `reasoning_content` (DeepSeek's API) and
            # `reasoning` (its newer name).
            delta["reasoning_content"] = delta["reasoning"] = thought
            if not text:
                del delta["content"]
        if first:
            delta["role"] = "assistant"
        return delta

    def _engine_error(self, ctx: ResponseContext, exc: Exception) -> ApiError:
        if self.engine.errored or type(exc).__name__ == "EngineDeadError":
            return api.unavailable("the engine of this replica died while generating; "
                                   "retry: Serve is replacing the replica")
        if isinstance(exc, ValueError):
            return ApiError(400, str(exc))
        logger.exception("request %s failed", ctx.request_id)
        return ApiError(500, f"internal error while generating ({type(exc).__name__})",
                        type_="internal_error")

    def _log_done(self, ctx: ResponseContext, gen: Generation, seconds: float) -> None:
        # The text only when the operator asked for it (--log-prompts).
        text = f" text={gen.text!r}" if self.serve_config.log_prompts else ""
        logger.info("request %s done in %.3fs: prompt_tokens=%d completion_tokens=%d finish=%s%s",
                    ctx.request_id, seconds, gen.prompt_tokens, gen.completion_tokens,
                    gen.finish_reason, text)
