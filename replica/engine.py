"""Builds the vLLM async engine for one replica and wraps the few engine calls the API needs."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from replica import vllm_compat
from replica.config import EngineConfig
from replica.data_parallel import RankGroup

logger = logging.getLogger("ray.serve")


def build_engine(config: EngineConfig, args: Any, group: RankGroup | None = None):
    """Create vLLM's AsyncLLM from `vllm serve`'s arguments (replica.vllm_app.serve_args), inside
    the current (replica) process.

    For tensor/pipeline parallelism on GPUs the replica was scheduled in its own placement group
    (one bundle per GPU: STRICT_PACK on one node, or one node per pipeline stage; see
    common/deploy_options.py). vLLM's Ray executor is pointed at that group, so its workers take exactly
    those GPUs; a group whose tensor-parallel ranks would span nodes is refused first. Without this, the replica would reserve GPUs
    for itself and vLLM would create a second placement group for its workers: the same GPUs
    booked twice, which is why a second TP=8 replica could never be placed on a 2 x 8 GPU cluster.
    A data-parallel rank (`group`) of tensor parallel size > 1 sits in its gang's group instead,
    and its workers take only its own bundles of it (worker_bundles).
    """
    engine_args = vllm_compat.engine_args_from_cli(args)
    apply_offline_batch_limits(engine_args, config)
    vllm_config = vllm_compat.create_engine_config(engine_args)
    if config.uses_ray_workers:
        import ray.util

        placement_group = ray.util.get_current_placement_group()
        if placement_group is None:
            raise RuntimeError(
                "tensor/pipeline parallelism needs the replica to run in its own placement group "
                "(placement_group_bundles); deploy it through common.deploy")
        worker_bundles(placement_group, config, group)
        vllm_compat.set_placement_group(vllm_config, placement_group)
    logger.info("starting vLLM engine: model=%s tp=%d pp=%d device=%s pid=%d",
                config.model, config.tensor_parallel_size, config.pipeline_parallel_size,
                config.device, os.getpid())
    with shared_gpu_start_turn(config, assigned_gpu_share()):
        return vllm_compat.start_engine(vllm_config, engine_args, engine_stat_loggers(config))


def assigned_gpu_share() -> float:
    """The GPUs Ray gave this replica (below 1: a share of one GPU)."""
    import ray

    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


@contextlib.contextmanager
def shared_gpu_start_turn(config: EngineConfig, share: float, lock_dir: str | None = None):
    """Replicas that share a GPU (--gpus-per-replica below 1) start their engines one at a time.
    vLLM sizes the KV cache from the GPU's free memory while it starts, assuming no other process
    on the GPU frees memory meanwhile (else it fails: "Error in memory profiling") and counting
    what another allocates as its own: two engines starting side by side can fail or get unequal
    caches. A fixed --kv-cache-memory-bytes skips that measurement, so those start together."""
    if config.device != "cuda" or not 0.0 < share < 1.0 or config.kv_cache_memory_bytes:
        yield
        return
    import fcntl
    import tempfile

    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-")
    path = os.path.join(lock_dir or tempfile.gettempdir(), f"deepseek-serve-gpu-{devices}.start")
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("GPU %s is shared: waiting for the replica starting on it to finish "
                        "(vLLM measures free GPU memory while it starts)", devices)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def first_generation(engine: Any) -> None:
    """One token from a one-token prompt before the replica says it is ready: an engine whose
    core dies on its first forward pass (a kernel the processor rejects) then fails the replica's
    start, and the deploy reports it, instead of a RUNNING replica answering every request 503."""
    await vllm_compat.generate_greedy(engine, [0], max_tokens=1,
                                      request_id=f"first-generation-{os.getpid()}")


def worker_bundles(placement_group: Any, config: EngineConfig,
                   group: RankGroup | None = None) -> list[int]:
    """The bundles of `placement_group` whose GPUs vLLM's Ray workers take, checked. A replica's
    own group: all of them (check_stage_placement). A data-parallel rank in its gang's group:
    its own slice (data_parallel.rank_bundles), handed to vLLM's Ray executor
    (vllm_compat.set_worker_bundles), as ray.serve.llm's data-parallel server does."""
    if group is None:
        check_stage_placement(placement_group, config)
        return [i for i, bundle in enumerate(placement_group.bundle_specs)
                if bundle.get("GPU", 0) > 0]
    from ray.util.placement_group import placement_group_table

    from replica.data_parallel import rank_bundles

    table = placement_group_table(placement_group).get("bundles_to_node_id") or {}
    nodes = [table.get(i) for i in range(len(placement_group.bundle_specs))]
    mine = rank_bundles(group.rank, config.gpus_per_replica, nodes, group.first_node)
    vllm_compat.set_worker_bundles(mine)
    logger.info("data-parallel rank %d: tensor-parallel workers in bundles %s on node %s",
                group.rank, mine, str(nodes[mine[0]])[:12])
    return mine


def check_stage_placement(placement_group: Any, config: EngineConfig) -> None:
    """Log which node holds which pipeline stage, and refuse (RuntimeError: Serve then retries
    the replica in a new group) a group where a tensor-parallel group would span nodes."""
    import ray
    from ray.util.placement_group import placement_group_table

    from replica.parallel_layout import split_groups, stages_per_node

    bundles = placement_group.bundle_specs
    table = placement_group_table(placement_group).get("bundles_to_node_id") or {}
    nodes = [table.get(i) for i in range(len(bundles))]
    driver = ray.get_runtime_context().get_node_id()
    layout = stages_per_node(bundles, nodes, driver, config.tensor_parallel_size)
    logger.info("pipeline stages per node: %s",
                ", ".join(f"{node[:12]}: {stages}" for node, stages in layout.items()))
    problems = split_groups(bundles, nodes, config.tensor_parallel_size)
    if problems:
        raise RuntimeError("a tensor-parallel group of this replica would span nodes ("
                           + "; ".join(problems) + "); redeploy so that each pipeline stage "
                           "sits on one node (common/replica_layout.py)")


def engine_stat_loggers(config: EngineConfig) -> list | None:
    """vLLM's Prometheus metrics recorded through Ray's metrics API, so that every replica's
    engine metrics leave through the node's Ray metrics endpoint (vLLM's own prometheus_client
    registry has no HTTP server inside a Serve replica). None (vLLM's default loggers) only when
    the flag is off: a vLLM that cannot export them with --engine-metrics true is an error
    (VllmIncompatible, which the deploy's vllm_compat.check reports before reserving GPUs)."""
    if not config.engine_metrics:
        return None
    from replica.metrics_export import labelled_stat_logger

    return [labelled_stat_logger(vllm_compat.ray_stat_logger())]


@contextlib.contextmanager
def serve_log_handlers_kept():
    """Keep Serve's replica log file working across vLLM's start.

    vLLM configures its logging with logging.config.dictConfig when first imported, and
    dictConfig closes every existing handler of the process. Serve writes the replica log
    (logs/serve/replica_*.log) through a MemoryHandler, which forgets its target file when
    closed: without this, everything the replica logs after the engine starts (request IDs,
    timings, access logs) silently vanishes from that file. The file handler reopens itself
    on the next record once it is the target again."""
    import logging.handlers

    memory_handlers = [(h, h.target) for name in ("ray.serve", "ray")
                       for h in logging.getLogger(name).handlers
                       if isinstance(h, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in memory_handlers:
            if handler.target is None and target is not None:
                handler.setTarget(target)


def apply_offline_batch_limits(engine_args: Any, config: EngineConfig) -> None:
    """With --batch-limits offline on GPUs, the batch limits vLLM picks for its offline `LLM` class
    where the operator set none: on H100/H200-class GPUs twice the tokens per step of the
    API-server context, more throughput with hundreds of requests in flight, later first tokens
    (bench/README.md). A vLLM without `get_batch_defaults(world_size)` is an error
    (VllmIncompatible): the operator asked for these limits."""
    if config.batch_limits != "offline" or config.device != "cuda":
        return
    vllm_compat.apply_batch_defaults(engine_args, config.gpus_per_replica)
