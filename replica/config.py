"""A replica's engine and serving configuration: one dataclass each (their flags: common/options.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SERVED_MODEL_NAME = "DeepSeek-R1"
DEFAULT_MODEL_PATH = "deepseek-ai/DeepSeek-R1"
BATCH_LIMITS = ("serve", "offline")
# EngineConfig fields that take one of a few values: their flags' choices and validate()'s check.
ENGINE_CHOICES = {"device": ("cuda", "cpu"), "batch_limits": BATCH_LIMITS}

# Env vars that make the CPU build start in seconds and behave on small machines. Only applied
# for device=cpu, and only where the operator has not set them.
CPU_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Every replica this project deploys carries this mark, so stop_service.py can tell the
# applications it deployed from others on the same cluster.
PROJECT_MARKER_ENV = {"DEEPSEEK_SERVE_DEPLOYMENT": "1"}
# Serve runs user code on a separate thread by default; with an asyncio engine the extra hop
# between event loops costs throughput (figures: bench/README.md).
SERVE_REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # Behind HAProxy a replica serves HTTP itself and answers backpressure with Serve's own plain
    # text; Serve wraps that server in the middlewares this callable returns (JSON errors).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "replica.serve_errors:json_error_middlewares",
    **PROJECT_MARKER_ENV,
}


@dataclass
class EngineConfig:
    """Everything needed to build one vLLM engine inside one replica."""

    model: str = DEFAULT_MODEL_PATH
    served_model_name: str = DEFAULT_SERVED_MODEL_NAME
    device: str = "cuda"                      # cuda | cpu
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Where --max-num-seqs / --max-num-batched-tokens are unset: "serve" keeps the limits
    # `vllm serve` picks (its first tokens and token cadence); "offline" takes those of vLLM's
    # offline LLM class, up to twice the tokens per step on large GPUs (more throughput with
    # hundreds of requests in flight, later first tokens). Figures: bench/README.md.
    batch_limits: str = "serve"
    enforce_eager: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    load_format: str = "auto"                 # "dummy" = random weights (benchmarks)
    kv_cache_memory_bytes: int | None = None  # CPU: a fixed KV cache instead of a RAM fraction
    enable_prefix_caching: bool | None = None
    engine_metrics: bool = True               # vLLM metrics out through Ray's /metrics
    # The planner's KV cache in tokens per replica (None: not planned): the replica reports
    # vLLM's own figure beside it and warns when vLLM allocated less.
    planned_kv_cache_tokens: int | None = None
    # Any other `vllm serve` flags, parsed by vLLM's own parser in the replica.
    vllm_args: list[str] = field(default_factory=list)
    # Any vLLM engine argument by its AsyncEngineArgs field name (--engine-kwargs JSON, as
    # ray.serve.llm's engine_kwargs); checked against vLLM's fields before deploying.
    extra_engine_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def uses_ray_workers(self) -> bool:
        """GPUs over several workers: vLLM's Ray executor runs them in the replica's own
        placement group (common/deploy.py reserves it, replica/engine.py hands it to vLLM)."""
        return self.device == "cuda" and self.gpus_per_replica > 1

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vllm.AsyncEngineArgs (only those set, so vLLM's defaults rule)."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "served_model_name": [self.served_model_name],
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "trust_remote_code": self.trust_remote_code,
            "seed": self.seed,
            "load_format": self.load_format,
            # Per-request logging would put prompts into logs; off by design.
            "enable_log_requests": False,
        }
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "kv_cache_memory_bytes", "enable_prefix_caching"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.uses_ray_workers:
            kwargs["distributed_executor_backend"] = "ray"
        return kwargs

    def validate(self) -> list[str]:
        problems = []
        for name, allowed in ENGINE_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                problems.append(f"--{name.replace('_', '-')} must be one of "
                                f"{', '.join(allowed)}, got {value!r}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            problems.append("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
        if self.device == "cpu" and self.gpus_per_replica > 1:
            problems.append("--device cpu runs one engine process per replica: "
                            "use --tensor-parallel-size 1 --pipeline-parallel-size 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            problems.append("--gpu-memory-utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 16:
            problems.append("--max-model-len must be >= 16")
        return problems


@dataclass
class ServeConfig:
    """How the application is exposed and how replicas take load."""

    app_name: str = "deepseek"
    route_prefix: str = "/"
    host: str = "0.0.0.0"
    port: int = 8000
    # vLLM batches everything a replica holds (up to max_num_seqs, which is 1024 on large GPUs):
    # Serve's limit must not cut the batch below that, or requests wait in the proxy while the
    # GPU has room.
    max_ongoing_requests: int = 1024
    max_queued_requests: int = 1024
    cpus_per_replica: float = 1.0
    timeout_s: float = 900.0
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    log_prompts: bool = False
    reasoning_parser: str = "auto"            # auto | none | a vLLM reasoning parser name
    # Extra replicas Serve may start during a rolling restart, in % of the target count; 0 (Serve's
    # default) stops old replicas before starting new ones, which needs free GPUs for none.
    max_surge_percent: int = 0
    env_vars: dict[str, str] = field(default_factory=dict)


# vLLM's bf16 CPU kernels answer differently by processor: on CPUs with AMX the demo's instruct
# model answers greedily with nonsense in bf16 (and in fp32 as transformers does), so `auto`
# (the checkpoint's bf16) means float32 on CPU, the same numbers on every x86-64 processor.
CPU_DEFAULT_DTYPE = "float32"
# A fixed KV cache (vLLM otherwise reserves 92% of the NUMA node's RAM): 2,900 float32 tokens of
# the demo's SmolLM2-135M, more than its 2,048-token context.
CPU_DEFAULT_KV_CACHE_BYTES = 128 * 2**20


def apply_cpu_defaults(config: EngineConfig) -> EngineConfig:
    """Settings without which vllm-cpu reserves most of the machine's RAM, compiles for a minute,
    or answers differently on processors with AMX."""
    if config.kv_cache_memory_bytes is None:
        config.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    if config.dtype == "auto":
        config.dtype = CPU_DEFAULT_DTYPE
    # torch.compile costs 25-45 s per start on CPU and its cache does not reload there.
    config.enforce_eager = True
    if config.max_model_len is None:
        config.max_model_len = 2048
    return config


def operator_env_wins(env: dict[str, str]) -> dict[str, str]:
    """Our settings, each replaced by the value the operator set in this process's environment."""
    return {key: os.environ.get(key, value) for key, value in env.items()}


# Network settings of the collective libraries (NCCL between GPUs, Gloo for vLLM's CPU-side
# groups, UCX, torch's tensorpipe). Ray starts a replica's workers with the environment of the
# raylet on their own node, not the deploy shell's, so a pipeline stage on another node would
# otherwise pick its own interface (often the wrong one). The replica's runtime_env reaches its
# vLLM workers: vLLM's Ray executor hands the replica's runtime_env to the workers it starts
# (`parallel_config.ray_runtime_env`), and Ray's children inherit their parent's env_vars.
NETWORK_ENV_PREFIXES = ("NCCL_", "GLOO_", "UCX_")
NETWORK_ENV_NAMES = ("TP_SOCKET_IFNAME",)


def network_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The collective libraries' network variables set in `environ` (default: this process)."""
    environ = dict(os.environ if environ is None else environ)
    return {key: value for key, value in sorted(environ.items())
            if key.startswith(NETWORK_ENV_PREFIXES) or key in NETWORK_ENV_NAMES}


def replica_env(engine: EngineConfig | None, extra: dict[str, str] | None = None
                ) -> dict[str, str]:
    """Env vars for the replica processes (passed through the runtime_env); a replica with
    Ray workers also carries the deploy shell's NCCL/Gloo network settings to every node.
    engine None: a replica holding no engine (the router), which takes Serve's settings only."""
    cpu = engine is not None and engine.device == "cpu"
    env = {**SERVE_REPLICA_ENV, **(CPU_ENGINE_ENV if cpu else {})}
    carried = network_env() if engine is not None and engine.uses_ray_workers else {}
    return {**operator_env_wins(env), **carried, **(extra or {})}
