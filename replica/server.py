"""The replica: one vLLM engine serving vLLM's own OpenAI app, with the guide's POST / on top."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from replica import data_parallel, ray_compat, versions, vllm_app, vllm_compat
from replica.config import EngineConfig, ServeConfig

logger = logging.getLogger("ray.serve")

_REPLICA_NODES_TTL_S = 5.0
_replica_nodes_cache: tuple[float, dict[str, int]] = (0.0, {})

# The placement-group application's round-robin router (replica/ingress.py): it holds no engine.
ROUTER_DEPLOYMENT = "Router"


def app_replica_nodes() -> dict[str, int]:
    """Node ID -> RUNNING engine replicas of the current Serve application, from Serve's
    controller (cached a few seconds: load tests may ask often). Routers hold no engine."""
    global _replica_nodes_cache
    cached_at, nodes = _replica_nodes_cache
    if time.monotonic() - cached_at < _REPLICA_NODES_TTL_S:
        return nodes
    from ray import serve

    from replica import ray_compat

    app_name = serve.get_replica_context().app_name
    details = ray_compat.serve_details(ray_compat.serve_client())
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


def warn_if_untested(ray_version: str, vllm_version: str, node_id: str) -> None:
    """Every replica start on a Ray/vLLM pair outside the tested table says so in its log (the
    deploy refused it unless the operator passed --allow-untested-versions)."""
    if not versions.is_tested(ray_version, vllm_version):
        logger.warning("%s; starting anyway (deployed with %s)",
                       versions.untested_message(ray_version, vllm_version,
                                                 f"node {node_id[:12]}"),
                       versions.ALLOW_UNTESTED_FLAG)


def chat_template_of(model: str) -> str:
    """The chat template a local checkout ships ("" for a hub ID or none)."""
    folder = Path(model)
    template = folder / "chat_template.jinja"
    if template.is_file():
        return template.read_text(errors="replace")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("chat_template") or ""
        except (OSError, ValueError):
            return ""
        return value if isinstance(value, str) else json.dumps(value)
    return ""


def reasoning_parser_for(choice: str, model: str) -> str:
    """vLLM's reasoning parser for this model: `auto` picks deepseek_r1 for models whose chat
    template opens the answer with <think> (DeepSeek-R1 and its distills), none otherwise."""
    if choice == "auto":
        return "deepseek_r1" if "<think>" in chat_template_of(model) else ""
    return "" if choice == "none" else choice


# vLLM allocating this much less KV cache than the planner predicted is worth a warning: the
# planner's layout choices and its refusals rest on that prediction.
KV_PLAN_SHORTFALL = 0.05


def kv_cache_report(tokens: int, planned: int | None) -> tuple[str, bool]:
    """The start log's line on the KV cache vLLM allocated, beside the planner's prediction;
    and whether vLLM's is short of it by more than KV_PLAN_SHORTFALL."""
    line = f"KV cache: {tokens} tokens (vLLM's, after its memory profile)"
    if not planned:
        return line, False
    ratio = tokens / planned
    short = ratio < 1 - KV_PLAN_SHORTFALL
    line += f"; the deploy's planner predicted {planned} ({100 * (ratio - 1):+.1f}%)"
    if short:
        line += (": the planner over-estimated the room for this model and GPU, so its layout "
                 "checks are optimistic here (--min-sequences raises their margin)")
    return line, short


# A replica whose engine died can answer nothing but 503s, and Serve's health check takes up to
# its period to notice. The replica ends its own process once the requests it held have their
# answers (at most DEAD_ENGINE_DRAIN_S): its port then refuses connections, which HAProxy retries
# on another replica, while Serve starts a new one.
ENGINE_WATCH_S = 0.5
DEAD_ENGINE_DRAIN_S = 2.0
DEAD_ENGINE_EXIT_CODE = 70


class LLMServer:
    """One vLLM engine and the app serving it. `LLMDeployment` (replica/ingress.py) puts the app
    behind Serve's HTTP ingress; `LLMBackend` serves it on an HTTP server of its own for a router."""

    # Set when Serve stops the replica: the engine then ends on purpose.
    _stopping = False
    # With --data-parallel-size: this replica's rank, and on rank 0 the group address's key.
    data_parallel_rank: int | None = None
    _group_keys: list[str] = []

    async def __init__(self, engine_config: EngineConfig, serve_config: ServeConfig):
        import ray

        from replica.engine import build_engine, first_generation, serve_log_handlers_kept

        self.engine_config = engine_config
        self.serve_config = serve_config
        self.model_name = engine_config.served_model_name
        self.node_id = ray.get_runtime_context().get_node_id()
        with serve_log_handlers_kept():
            # Inside: the first import of vLLM reconfigures logging (serve_log_handlers_kept).
            warn_if_untested(ray.__version__, vllm_compat.vllm_version(), self.node_id)
            engine_kwargs = engine_config.engine_kwargs()
            group = None
            if engine_config.data_parallel_size > 1:
                group = await data_parallel.join_group(engine_config.data_parallel_size)
                self._group_keys = group.keys
                engine_kwargs.update(group.kwargs)
                self.data_parallel_rank = group.rank
            args = vllm_app.serve_args(engine_kwargs, engine_config.vllm_args,
                                       extra=engine_config.extra_engine_kwargs)
            # vLLM's own request log carries the prompt text: only when the operator asks.
            vllm_compat.set_request_logging(args, serve_config.log_prompts)
            parser = reasoning_parser_for(serve_config.reasoning_parser, engine_config.model)
            if parser:
                vllm_compat.set_reasoning_parser(args, parser)
            self.engine = build_engine(engine_config, args, group)
            try:
                await first_generation(self.engine)
            except Exception as exc:  # any failure (re-raised): the replica must not start
                vllm_compat.shutdown_engine(self.engine)
                raise RuntimeError(f"the vLLM engine started but failed its first generation "
                                   f"({type(exc).__name__}: {exc}); the replica does not start"
                                   ) from exc
            openai_app = await vllm_compat.build_openai_app(self.engine, args)
        self.aborted = 0
        self._count_aborts()
        self.replica_app = vllm_app.ReplicaApp(
            openai_app, node_id=self.node_id, model_name=self.model_name,
            api_key=serve_config.api_key, max_body_bytes=serve_config.max_body_bytes,
            engine=self.engine, status=self.status, replica_nodes=app_replica_nodes)
        logger.info("replica ready on node %s: model %s, context %d tokens, reasoning parser %s",
                    self.node_id, self.model_name, vllm_compat.max_model_len(self.engine),
                    parser or "none")
        kv_line, short = kv_cache_report(vllm_compat.kv_cache_tokens(self.engine),
                                         engine_config.planned_kv_cache_tokens)
        (logger.warning if short else logger.info)("%s", kv_line)
        self._engine_watch = asyncio.get_running_loop().create_task(self._end_when_engine_dies())

    async def _end_when_engine_dies(self) -> None:
        """Ends this replica's process when its engine dies (see DEAD_ENGINE_DRAIN_S)."""
        while not vllm_compat.engine_errored(self.engine):
            await asyncio.sleep(ENGINE_WATCH_S)
        if self._stopping:  # Serve is stopping the replica: the engine ended on purpose
            return
        app = self.replica_app
        logger.error("the vLLM engine of this replica died (%s); the replica ends its process "
                     "once its %d request(s) in flight have their answers, so that requests go "
                     "to other replicas while Serve starts a new one",
                     vllm_compat.engine_dead_error(self.engine), app.in_flight)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEAD_ENGINE_DRAIN_S
        while app.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the last answers' bytes leave the socket
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        os._exit(DEAD_ENGINE_EXIT_CODE)

    def _count_aborts(self) -> None:
        """Count the engine's aborts (a client that went away, a cancelled stream): GET /nodes
        reports them, so an operator can see that dropped clients free the GPU."""
        def aborted() -> None:
            self.aborted += 1

        vllm_compat.count_aborts(self.engine, aborted)

    def status(self) -> dict[str, Any]:
        return {"node": self.node_id, "model": self.model_name,
                "engine_alive": not vllm_compat.engine_errored(self.engine),
                "engine_unfinished_requests": vllm_compat.unfinished_requests(self.engine),
                "engine_aborted_requests": self.aborted,
                "engine_layout": {"device": self.engine_config.device,
                                  "tensor_parallel_size": self.engine_config.tensor_parallel_size,
                                  "pipeline_parallel_size": self.engine_config.pipeline_parallel_size,
                                  "data_parallel_size": self.engine_config.data_parallel_size,
                                  "data_parallel_rank": self.data_parallel_rank,
                                  "max_model_len": vllm_compat.max_model_len(self.engine)},
                "engine_kv_cache": {
                    "tokens": vllm_compat.kv_cache_tokens(self.engine),
                    "planned_tokens": self.engine_config.planned_kv_cache_tokens}}

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve asks this every few seconds where a request router wants it (--routing
        prefix): the requests this replica is answering, its load."""
        app = getattr(self, "replica_app", None)
        return {"in_flight": app.in_flight if app is not None else 0, "at": time.time()}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if vllm_compat.engine_errored(self.engine):
            raise RuntimeError(f"vLLM engine is dead: {vllm_compat.engine_dead_error(self.engine)}")

    def __del__(self):
        # Serve calls this when it stops the replica: end the engine's processes with it.
        self._stopping = True
        engine = getattr(self, "engine", None)
        if engine is not None:
            vllm_compat.shutdown_engine(engine)
        for key in self._group_keys:
            with contextlib.suppress(Exception):  # the GCS may be gone with the cluster
                ray_compat.kv_del(key)
