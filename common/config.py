"""Engine and serving configuration: one dataclass each, every field a CLI flag with an env fallback."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from common.cli import add_flag

DEFAULT_SERVED_MODEL_NAME = "DeepSeek-R1"
DEFAULT_MODEL_PATH = "deepseek-ai/DeepSeek-R1"

# Env vars that make the CPU build start in seconds and behave on small machines; measured, see
# README ("CPU demo"). Only applied for device=cpu, and only where the operator has not set them.
CPU_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Serve runs user code on a separate thread by default; with an asyncio engine the extra hop
# between event loops costs throughput (measured on an H100: about 13% of output tok/s).
SERVE_REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # Behind HAProxy a replica serves HTTP itself and answers backpressure with Serve's own plain
    # text; Serve wraps that server in the middlewares this callable returns (JSON errors).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "common.serve_errors:json_error_middlewares",
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
    enforce_eager: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    load_format: str = "auto"                 # "dummy" = random weights (benchmarks)
    kv_cache_memory_bytes: int | None = None  # CPU: a fixed KV cache instead of a RAM fraction
    enable_prefix_caching: bool | None = None
    engine_metrics: bool = True               # vLLM metrics out through Ray's /metrics
    # Any other `vllm serve` flags, parsed by vLLM's own parser in the replica.
    vllm_args: list[str] = field(default_factory=list)

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def uses_ray_workers(self) -> bool:
        """GPUs over several workers: vLLM's Ray executor runs them in the replica's own
        placement group (common/deploy.py reserves it, common/engine.py hands it to vLLM)."""
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
        if self.device not in ("cuda", "cpu"):
            problems.append(f"--device must be cuda or cpu, got {self.device!r}")
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
    # vLLM batches everything a replica holds (up to max_num_seqs, 1024 on an H100-class GPU):
    # Serve's limit must not cut the batch below that, or requests wait in the proxy while the
    # GPU has room (256 here held 512 in-flight requests to half a batch).
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


# Flag table: (flag, field, env var, type, help). Defaults come from the dataclasses so that the
# code and --help cannot disagree.
_ENGINE_FLAGS: list[tuple[str, str, str | None, Any, str]] = [
    ("--model", "model", "MODEL_PATH", str, "model path or Hugging Face ID"),
    ("--served-model-name", "served_model_name", "SERVED_MODEL_NAME", str,
     "model name reported in responses and on /v1/models"),
    ("--device", "device", "DEVICE", str,
     "cuda: GPUs with the vllm build; cpu: the vllm-cpu build, reserving CPUs instead of GPUs"),
    ("--tensor-parallel-size", "tensor_parallel_size", "TENSOR_PARALLEL_SIZE", int,
     "GPUs per replica for tensor parallelism"),
    ("--pipeline-parallel-size", "pipeline_parallel_size", "PIPELINE_PARALLEL_SIZE", int,
     "pipeline stages per replica"),
    ("--dtype", "dtype", "DTYPE", str, "weights/activations dtype (auto, bfloat16, float16, ...)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", float,
     "fraction of each GPU's memory vLLM may use (weights + KV cache)"),
    ("--max-model-len", "max_model_len", "MAX_MODEL_LEN", int,
     "context length (prompt + max_tokens); default: the model's"),
    ("--max-num-seqs", "max_num_seqs", "MAX_NUM_SEQS", int,
     "sequences batched per engine step; default: vLLM's for the device"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", "MAX_NUM_BATCHED_TOKENS", int,
     "tokens per engine step; default: vLLM's for the device"),
    ("--enforce-eager", "enforce_eager", "ENFORCE_EAGER", bool,
     "disable CUDA graphs / torch.compile (faster start, slower decode)"),
    ("--trust-remote-code", "trust_remote_code", "TRUST_REMOTE_CODE", bool,
     "allow the model's own Python code from its folder"),
    ("--seed", "seed", "SEED", int, "engine random seed"),
    ("--load-format", "load_format", "LOAD_FORMAT", str,
     "auto, safetensors, ... or dummy (random weights, for benchmarks)"),
    ("--kv-cache-memory-bytes", "kv_cache_memory_bytes", "KV_CACHE_MEMORY_BYTES", int,
     "fixed KV-cache size in bytes instead of a memory fraction (CPU default: 64 MiB)"),
    ("--engine-metrics", "engine_metrics", "ENGINE_METRICS", bool,
     "export vLLM's engine metrics (ray_vllm_*) through Ray's metrics endpoint; see "
     "docs/operations.md"),
]

_SERVE_FLAGS: list[tuple[str, str, str | None, Any, str]] = [
    ("--app-name", "app_name", "SERVE_APP_NAME", str, "Serve application name"),
    ("--route-prefix", "route_prefix", "ROUTE_PREFIX", str, "HTTP route prefix of the application"),
    ("--host", "host", "SERVE_HOST", str,
     "HTTP bind address of Serve's proxies (0.0.0.0 = reachable from the network)"),
    ("--port", "port", "SERVE_PORT", int, "HTTP port"),
    ("--max-ongoing-requests", "max_ongoing_requests", "MAX_ONGOING_REQUESTS", int,
     "requests one replica works on at once; vLLM batches them, so keep it high"),
    ("--max-queued-requests", "max_queued_requests", "MAX_QUEUED_REQUESTS", int,
     "requests waiting for a replica before new ones get 503 (-1: unbounded)"),
    ("--cpus-per-replica", "cpus_per_replica", "CPUS_PER_REPLICA", float,
     "CPUs reserved for each replica's process"),
    ("--timeout", "timeout_s", "DEPLOY_TIMEOUT", float,
     "seconds to wait for all replicas to be ready before giving up"),
    ("--api-key", "api_key", "API_KEY", str,
     "require 'Authorization: Bearer KEY' on every endpoint but /health"),
    ("--max-body-bytes", "max_body_bytes", "MAX_BODY_BYTES", int,
     "largest request body accepted (413 above)"),
    ("--log-prompts", "log_prompts", "LOG_PROMPTS", bool,
     "vLLM's per-request log in the replica logs, prompt text included (off: Serve's access "
     "log only: request IDs, routes, statuses, latencies)"),
    ("--reasoning-parser", "reasoning_parser", "REASONING_PARSER", str,
     "vLLM reasoning parser for /v1/chat/completions (reasoning_content); auto: deepseek_r1 "
     "when the model's chat template opens the answer with <think> (DeepSeek-R1 and its "
     "distills), none otherwise; or any parser name vLLM knows"),
    ("--max-surge-percent", "max_surge_percent", "MAX_SURGE_PERCENT", int,
     "extra replicas (%% of the target) a rolling restart may start before stopping old ones; "
     "0 stops first (no spare GPUs needed), 100 keeps full capacity during a model change"),
]


def _add_flags(parser: argparse._ActionsContainer, table, defaults) -> None:
    for flag, name, env, type_, help_ in table:
        extra: dict[str, Any] = {}
        if name == "device":
            extra["choices"] = ["cuda", "cpu"]
        add_flag(parser, flag, dest=name, env=env, default=getattr(defaults, name), type=type_,
                 help=help_, **extra)


def add_engine_args(parser: argparse.ArgumentParser, defaults: EngineConfig | None = None) -> None:
    _add_flags(parser.add_argument_group("engine (vLLM)"), _ENGINE_FLAGS, defaults or EngineConfig())


def add_serve_args(parser: argparse.ArgumentParser, defaults: ServeConfig | None = None) -> None:
    _add_flags(parser.add_argument_group("serving (Ray Serve)"), _SERVE_FLAGS,
               defaults or ServeConfig())


def _from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    config = _from_args(EngineConfig, args)
    # Replicas do not run in the driver's directory: a relative model folder must travel as an
    # absolute path (a Hugging Face ID, which is no local path, stays as given).
    if os.path.exists(config.model):
        config.model = os.path.abspath(config.model)
    if config.device == "cpu":
        apply_cpu_defaults(config)
    return config


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    return _from_args(ServeConfig, args)


def apply_cpu_defaults(config: EngineConfig) -> EngineConfig:
    """Settings without which vllm-cpu reserves most of the machine's RAM or compiles for a minute."""
    # vLLM on CPU sizes its KV cache as a fraction of the NUMA node's RAM and refuses to start
    # when that is taken; a fixed small cache starts in seconds.
    if config.kv_cache_memory_bytes is None:
        config.kv_cache_memory_bytes = 64 * 2**20
    # torch.compile costs 25-45 s per start on CPU and its cache does not reload there.
    config.enforce_eager = True
    if config.max_model_len is None:
        config.max_model_len = 2048
    return config


def replica_env(engine: EngineConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Env vars for the replica processes (passed through the runtime_env)."""
    env = dict(SERVE_REPLICA_ENV)
    if engine.device == "cpu":
        env.update(CPU_ENGINE_ENV)
    # The operator's own settings win over ours.
    for key in list(env):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env
