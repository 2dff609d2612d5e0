"""A replica's engine and serving configuration: one dataclass each (their flags: common/options.py)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SERVED_MODEL_NAME = "DeepSeek-R1"
DEFAULT_MODEL_PATH = "deepseek-ai/DeepSeek-R1"
BATCH_LIMITS = ("serve", "offline")
# How a request picks a replica (the router's choice among backends for ray-placement-group.py).
ROUTINGS = ("spread", "session", "prefix")
# --routing's default, resolved to one of ROUTINGS when the deployment is planned
# (common/deploy_options.py: auto_routing).
AUTO_ROUTING = "auto"
# The header that names a conversation for --routing session (Ray Serve's own name for it).
SESSION_HEADER = "x-session-id"


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
           env: str | None = None, choices: tuple[str, ...] | None = None,
           parse: str | None = None, factory: Any = None) -> Any:
    """A field that is also a deploy-script flag, declared once beside it: the flag (default:
    the field's name), its env var (default: the name upper-cased, with the project's prefix),
    help, choices, and a parser where the annotation is not enough (a name common/options.py
    resolves: replicas do not import the scripts' code). Flags, --help, validate() and the
    docs' flag table (docs/flags.md) all come from here."""
    metadata = {"help": help, "flag": flag, "env": env, "choices": choices, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class that are flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

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

    model: str = option(
        DEFAULT_MODEL_PATH, env="MODEL_PATH", help="model path or Hugging Face ID")
    served_model_name: str = option(
        DEFAULT_SERVED_MODEL_NAME,
        help="model name reported in responses and on /v1/models")
    device: str = option(
        "cuda", choices=("cuda", "cpu"),
        help="cuda: GPUs with the vllm build; cpu: the vllm-cpu build, reserving CPUs instead "
             "of GPUs")
    tensor_parallel_size: int = option(
        1, parse="parallel",
        help="GPUs per replica for tensor parallelism; auto: planned from the checkpoint and "
             "the cluster's GPUs (common/planner.py)")
    pipeline_parallel_size: int = option(
        1, parse="parallel",
        help="pipeline stages per replica; auto: planned (one stage per node)")
    data_parallel_size: int = option(
        1,
        help="data-parallel ranks per gang (wide expert parallelism for MoE models such as R1): "
             "each rank is a Serve replica with an engine of its own on --tensor-parallel-size "
             "GPUs of one node (default then 1), the ranks of a gang are one vLLM "
             "data-parallel group, placed together and restarted together (Serve's gang "
             "scheduling); --num-replicas then counts gangs. MoE models only")
    enable_expert_parallel: bool = option(
        False,
        help="split each MoE layer's routed experts over the GPUs of all data-parallel ranks "
             "(vLLM's flag; with --data-parallel-size: DP x EP) instead of slicing every expert "
             "by tensor parallelism")
    dtype: str = option(
        "auto",
        help="weights/activations dtype (auto, bfloat16, float16, ...); auto is float32 on "
             "--device cpu (vLLM's bf16 CPU kernels answer differently on processors with AMX)")
    gpu_memory_utilization: float = option(
        0.90,
        help="fraction of each GPU's memory vLLM may use (weights + KV cache); unset, the "
             "default is lowered (and said so) where it leaves less than vLLM allocates beyond "
             "it for the model (MLA models: about 14 GiB)")
    max_model_len: int | None = option(
        None, help="context length (prompt + max_tokens); default: the model's")
    max_num_seqs: int | None = option(
        None, help="sequences batched per engine step; default: vLLM's for the device")
    max_num_batched_tokens: int | None = option(
        None, help="tokens per engine step; default: vLLM's for the device")
    batch_limits: str = option(
        "serve", choices=BATCH_LIMITS,
        help="vLLM's defaults for the two flags above where unset: serve = those of `vllm "
             "serve` (first tokens and token cadence as it has them); offline = those of "
             "vLLM's offline LLM class (on large GPUs up to twice the tokens per step: more "
             "throughput with hundreds of requests in flight, later first tokens)")
    enforce_eager: bool = option(
        False, help="disable CUDA graphs / torch.compile (faster start, slower decode)")
    load_format: str = option(
        "auto", help="auto, safetensors, ... or dummy (random weights, for benchmarks)")
    kv_cache_memory_bytes: int | None = option(
        None, help="fixed KV-cache size in bytes instead of a memory fraction (CPU default: "
                   "128 MiB)")
    engine_metrics: bool = option(
        True,
        help="export vLLM's engine metrics (ray_vllm_*) through Ray's metrics endpoint (a "
             "histogram observation per streamed token on the replica's event loop: off for "
             "the lowest streaming latency); see docs/operations.md")
    extra_engine_kwargs: dict[str, Any] = option(
        factory=dict, flag="--engine-kwargs", env="ENGINE_KWARGS", parse="json",
        help="any other vLLM engine argument, as a JSON object of AsyncEngineArgs field names "
             "(as ray.serve.llm's engine_kwargs), e.g. '{\"kv_cache_dtype\": \"fp8\"}'; "
             "checked against the installed vLLM before deploying. A key that one of the flags "
             "above sets is refused: use the flag")
    enable_prefix_caching: bool | None = None
    # The planner's KV cache in tokens per replica (None: not planned): the replica reports
    # vLLM's own figure beside it and warns when vLLM allocated less.
    planned_kv_cache_tokens: int | None = None
    # Any other `vllm serve` flags (--seed, --trust-remote-code, ...: vLLM's own, not declared
    # again here), parsed by vLLM's own parser before deploying and in the replica.
    vllm_args: list[str] = field(default_factory=list)

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def uses_ray_workers(self) -> bool:
        """GPUs over several workers: vLLM's Ray executor runs them in the replica's own
        placement group (common/deploy_options.py reserves it, replica/engine.py hands it to vLLM)."""
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
        # The rank and its group's address are the gang's, known only inside the replica
        # (replica/data_parallel.py).
        if self.data_parallel_size > 1:
            kwargs["data_parallel_size"] = self.data_parallel_size
        if self.enable_expert_parallel:
            kwargs["enable_expert_parallel"] = True
        return kwargs

    def validate(self) -> list[str]:
        problems = []
        for option_field in option_fields(EngineConfig):
            name, allowed = option_field.name, option_field.metadata["choices"]
            value = getattr(self, name)
            if allowed and value not in allowed:
                problems.append(f"--{name.replace('_', '-')} must be one of "
                                f"{', '.join(allowed)}, got {value!r}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            problems.append("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
        if self.device == "cpu" and self.gpus_per_replica > 1:
            problems.append("--device cpu runs one engine process per replica: "
                            "use --tensor-parallel-size 1 --pipeline-parallel-size 1")
        if self.data_parallel_size < 1:
            problems.append("--data-parallel-size must be >= 1")
        elif self.data_parallel_size > 1 and self.pipeline_parallel_size > 1:
            problems.append(
                f"--data-parallel-size {self.data_parallel_size} with --pipeline-parallel-size "
                f"{self.pipeline_parallel_size}: a data-parallel rank is tensor parallel on one "
                "node at most (--tensor-parallel-size); give --pipeline-parallel-size 1, or "
                "drop --data-parallel-size for tensor x pipeline parallel replicas")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            problems.append("--gpu-memory-utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 16:
            problems.append("--max-model-len must be >= 16")
        return problems


@dataclass
class ServeConfig:
    """How the application is exposed and how replicas take load."""

    app_name: str = option("deepseek", help="Serve application name")
    route_prefix: str = option("/", help="HTTP route prefix of the application")
    host: str = option(
        "0.0.0.0",
        help="HTTP bind address of Serve's proxies (0.0.0.0 = reachable from the network)")
    port: int = option(8000, help="HTTP port")
    # vLLM batches everything a replica holds (up to max_num_seqs, which is 1024 on large GPUs):
    # Serve's limit must not cut the batch below that, or requests wait in the proxy while the
    # GPU has room.
    max_ongoing_requests: int = option(
        1024, help="requests one replica works on at once; vLLM batches them, so keep it high")
    max_queued_requests: int = option(
        1024, help="requests waiting for a replica before new ones get 503 (-1: unbounded)")
    cpus_per_replica: float = option(1.0, help="CPUs reserved for each replica's process")
    timeout_s: float = option(
        900.0, flag="--timeout", env="DEPLOY_TIMEOUT",
        help="seconds to wait for all replicas to be ready before giving up (exit 5, naming "
             "the resource demands that could not be met); unset, raised to what reading the "
             "planned weights from disk needs (docs/layout.md)")
    api_key: str | None = option(
        None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    max_body_bytes: int = option(4 * 2**20, help="largest request body accepted (413 above)")
    log_prompts: bool = option(
        False,
        help="vLLM's per-request log in the replica logs, prompt text included (off: Serve's "
             "access log only: request IDs, routes, statuses, latencies)")
    reasoning_parser: str = option(
        "auto",
        help="vLLM reasoning parser for /v1/chat/completions (the reasoning comes back in "
             "message.reasoning, delta.reasoning when streaming); auto: deepseek_r1 when the "
             "model's chat template opens the answer with <think> (DeepSeek-R1 and its "
             "distills), none otherwise; or any parser name vLLM knows")
    routing: str = option(
        AUTO_ROUTING, choices=(AUTO_ROUTING, *ROUTINGS),
        help=f"how a request picks a replica: auto = prefix for GPU engines with two or more "
             f"replicas behind HAProxy (where the side-by-side run measured it ahead: "
             f"bench/README.md (f)), spread otherwise (CPU engines, one replica, --ingress "
             f"proxy, --data-parallel-size gangs); the deploy says which. spread = by load "
             f"(HAProxy's least connections; ray-placement-group.py's router: round robin "
             f"over the backends up); session = every request with the same {SESSION_HEADER} header goes to the same replica, "
             f"whose prefix cache then holds the conversation (requests without it: round "
             f"robin); prefix = the replica that served the longest start of the request's "
             f"messages or prompt takes it (so a conversation's turns and a shared system "
             f"prompt find their cache without a header), unless it is busier than "
             f"--prefix-imbalance allows (needs --ingress haproxy). Serve's HTTP proxy "
             f"(--ingress proxy) honours {SESSION_HEADER} either way. Applies when this script "
             f"starts Serve (the router's: at every deploy)")
    prefix_imbalance: int = option(
        16,
        help="with --routing prefix: requests in flight a replica may have beyond the least "
             "busy replica and still take the requests whose prefix it holds (above that they "
             "go to the least busy: no replica is buried under one hot prefix)")
    # Extra replicas Serve may start during a rolling restart, in % of the target count; 0 (Serve's
    # default) stops old replicas before starting new ones, which needs free GPUs for none.
    max_surge_percent: int = option(
        0,
        help="extra replicas (%% of the target) a rolling restart may start before stopping old "
             "ones; 0 stops first (no spare GPUs needed), 100 keeps full capacity during a "
             "model change")
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
