"""The one module that touches vLLM's internals, each checked against the installed vLLM."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable

from replica import versions

# What the project's flags say when a feature needs an internal the installed vLLM lacks.
ENGINE_METRICS_OFF = "pass --engine-metrics false to deploy without vLLM's engine metrics"
BATCH_LIMITS_SERVE = "pass --batch-limits serve to keep `vllm serve`'s own batch limits"


class VllmIncompatible(RuntimeError):
    """The installed vLLM lacks an internal this project needs: one message names what is
    missing, the installed version and the tested ones; `missing` is that internal's name."""

    def __init__(self, message: str, missing: str = ""):
        super().__init__(message)
        self.missing = missing or message


def vllm_version() -> str:
    """The installed vLLM's version ('0.32.0'), or VllmIncompatible when there is none."""
    try:
        import vllm
    except ImportError as exc:
        raise VllmIncompatible(
            f"vLLM is not importable here ({exc}); tested pairs: {versions.tested_table()}. "
            "Install a tested vLLM (requirements.txt, or requirements-cpu.txt on CPU)") from exc
    version = getattr(vllm, "__version__", None)
    if not isinstance(version, str):
        raise VllmIncompatible(_message("of unknown version", "vllm.__version__"),
                               "vllm.__version__")
    return version


def _message(version: str, what: str, remedy: str = "") -> str:
    then = f"; {remedy}" if remedy else ""
    return (f"the installed vLLM {version} lacks {what}, which this project needs; tested "
            f"pairs: {versions.tested_table()}{then}. Install a tested vLLM "
            "(requirements.txt, or requirements-cpu.txt on CPU)")


def _incompatible(what: str, remedy: str = "", missing: str = "") -> VllmIncompatible:
    return VllmIncompatible(_message(vllm_version(), what, remedy), missing or what)


# ---- what the project needs, and its checks -------------------------------------------------


@dataclass(frozen=True)
class Need:
    """One vLLM internal: `attr` (a dotted path) of `module`, the keyword parameters the project
    passes it, and the members (attributes, dataclass fields, TypedDict keys) it reads or sets."""
    module: str
    attr: str
    params: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    use: str = ""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}"


def _member_names(obj: Any) -> set[str]:
    """What `members` may name: attributes (properties and methods included), dataclass fields
    (those without a class-level default are no attributes) and TypedDict keys."""
    names = set(dir(obj))
    if dataclasses.is_dataclass(obj):
        names |= {f.name for f in dataclasses.fields(obj)}
    # A TypedDict's keys (typing's or typing_extensions', which vLLM uses).
    names |= set(getattr(obj, "__required_keys__", ())) | set(getattr(obj, "__optional_keys__", ()))
    return names


def resolve(need: Need, remedy: str = "") -> Any:
    """The object `need` names in the installed vLLM, or VllmIncompatible naming what is missing."""
    vllm_version()  # vLLM itself first: its absence is one message, not one per symbol
    use = f" ({need.use})" if need.use else ""
    try:
        obj: Any = importlib.import_module(need.module)
    except ImportError as exc:
        raise _incompatible(f"the module {need.module}{use} ({exc})", remedy,
                            need.module) from exc
    path = need.module
    for part in need.attr.split("."):
        path = f"{path}.{part}"
        if not hasattr(obj, part):
            raise _incompatible(f"{path}{use}", remedy, path)
        obj = getattr(obj, part)
    if need.params:
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError) as exc:
            raise _incompatible(f"a readable signature of {need.name}{use} ({exc})",
                                remedy, need.name) from exc
        missing = [p for p in need.params if p not in parameters]
        if missing:
            raise _incompatible(f"the parameter{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} of {need.name}{use}", remedy,
                                f"{need.name}({', '.join(missing)})")
    if need.members:
        missing = [m for m in need.members if m not in _member_names(obj)]
        if missing:
            names = ", ".join(f"{need.name}.{m}" for m in missing)
            raise _incompatible(names + use, remedy, names)
    return obj


# The two module layouts of vLLM's OpenAI server, named by where its pieces live. Which one the
# installed vLLM has is decided by whether vllm.entrypoints.launchers exists (layout()); inside a
# layout every piece must then be there, so a half-moved release is an error, not a fallback.
LAYOUTS: dict[str, dict[str, Need]] = {
    # vLLM 0.27 and later (0.29.0 and 0.32.0 tested): vllm.entrypoints.launchers.*; both keep
    # aliases in vllm.entrypoints.openai.api_server, neither vllm.entrypoints.openai.cli_args.
    "launchers": {
        "make_arg_parser": Need("vllm.entrypoints.launchers.cli_args", "make_arg_parser",
                                ("parser",), use="vllm serve's flags"),
        "build_app": Need("vllm.entrypoints.launchers.app", "build_app",
                          ("args", "supported_tasks", "model_config"), use="vLLM's OpenAI app"),
        "init_app_state": Need("vllm.entrypoints.launchers.api_server.app_state",
                               "init_app_state",
                               ("engine_client", "state", "args", "supported_tasks"),
                               use="vLLM's OpenAI app"),
        # Reads app.state.server (build_openai_app puts a stand-in there) when the engine dies.
        "terminate_if_errored": Need("vllm.entrypoints.launchers.launcher",
                                     "terminate_if_errored", ("server", "engine"),
                                     use="app.state.server on engine errors"),
    },
    # vLLM 0.26 (tested on CUDA): the same pieces under vllm.entrypoints.openai, and
    # terminate_if_errored in vllm.entrypoints.launcher.
    "openai": {
        "make_arg_parser": Need("vllm.entrypoints.openai.cli_args", "make_arg_parser",
                                ("parser",), use="vllm serve's flags"),
        "build_app": Need("vllm.entrypoints.openai.api_server", "build_app",
                          ("args", "supported_tasks", "model_config"), use="vLLM's OpenAI app"),
        "init_app_state": Need("vllm.entrypoints.openai.api_server", "init_app_state",
                               ("engine_client", "state", "args", "supported_tasks"),
                               use="vLLM's OpenAI app"),
        "terminate_if_errored": Need("vllm.entrypoints.launcher", "terminate_if_errored",
                                     ("server", "engine"),
                                     use="app.state.server on engine errors"),
    },
}
LAUNCHERS_PACKAGE = "vllm.entrypoints.launchers"

ARG_PARSER = Need("vllm.utils.argparse_utils", "FlexibleArgumentParser",
                  use="vllm serve's flags")
ENGINE_ARGS = Need("vllm", "AsyncEngineArgs",
                   members=("enable_log_requests", "disable_log_stats",
                            "structured_outputs_config", "max_num_batched_tokens",
                            "max_num_seqs"),
                   use="the engine's arguments")
FROM_CLI_ARGS = Need("vllm", "AsyncEngineArgs.from_cli_args", ("args",),
                     use="the engine's arguments from vllm serve's flags")
CREATE_ENGINE_CONFIG = Need("vllm", "AsyncEngineArgs.create_engine_config", ("usage_context",),
                            use="the engine's configuration")
USAGE_CONTEXT = Need("vllm.usage.usage_lib", "UsageContext", members=("OPENAI_API_SERVER",),
                     use="the engine's usage context, as vllm serve's")
PARALLEL_CONFIG = Need("vllm.config", "ParallelConfig", members=("placement_group",),
                       use="the replica's placement group for vLLM's Ray workers")
MODEL_CONFIG = Need("vllm.config", "ModelConfig", members=("max_model_len",),
                    use="the context length in GET /nodes")
CACHE_CONFIG = Need("vllm.config", "CacheConfig", members=("num_gpu_blocks", "block_size"),
                    use="the KV cache size in GET /nodes, beside the planner's")
STRUCTURED_OUTPUTS = Need("vllm.config", "StructuredOutputsConfig", members=("reasoning_parser",),
                          use="--reasoning-parser")
ASYNC_LLM = Need("vllm.v1.engine.async_llm", "AsyncLLM",
                 members=("generate", "abort", "shutdown", "errored", "dead_error",
                          "get_supported_tasks"),
                 use="the replica's engine")
FROM_VLLM_CONFIG = Need("vllm.v1.engine.async_llm", "AsyncLLM.from_vllm_config",
                        ("vllm_config", "usage_context", "enable_log_requests",
                         "disable_log_stats", "stat_loggers"),
                        use="the replica's engine")
GENERATE = Need("vllm.v1.engine.async_llm", "AsyncLLM.generate",
                ("prompt", "sampling_params", "request_id"), use="the first generation")
OUTPUT_PROCESSOR = Need("vllm.v1.engine.output_processor", "OutputProcessor",
                        members=("get_num_unfinished_requests",),
                        use="the unfinished requests in GET /nodes")
SAMPLING_PARAMS = Need("vllm", "SamplingParams", ("max_tokens", "temperature"),
                       use="the first generation")
TOKENS_PROMPT = Need("vllm.inputs", "TokensPrompt", members=("prompt_token_ids",),
                     use="the first generation")
# --batch-limits offline on GPUs.
BATCH_DEFAULTS = Need("vllm", "AsyncEngineArgs.get_batch_defaults", ("world_size",),
                      use="--batch-limits offline")
LLM_CLASS_CONTEXT = Need("vllm.usage.usage_lib", "UsageContext", members=("LLM_CLASS",),
                         use="--batch-limits offline")
# --engine-metrics true: vLLM's Ray stat logger, and the hooks of its metric wrappers that
# labelled_stat_logger overrides to add the replica's labels and to record on a thread.
_WRAPPER_HOOKS = ("_get_tag_keys", "_build_tags", "labels")
STAT_LOGGER = Need("vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger",
                   members=("_gauge_cls", "_counter_cls", "_histogram_cls"),
                   use="--engine-metrics: engine metrics through Ray's metrics API")
METRIC_WRAPPERS = {
    "_gauge_cls": Need("vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger._gauge_cls",
                       members=(*_WRAPPER_HOOKS, "set"), use="--engine-metrics"),
    "_counter_cls": Need("vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger._counter_cls",
                         members=(*_WRAPPER_HOOKS, "inc"), use="--engine-metrics"),
    "_histogram_cls": Need("vllm.v1.metrics.ray_wrappers",
                           "RayPrometheusStatLogger._histogram_cls",
                           members=(*_WRAPPER_HOOKS, "observe"), use="--engine-metrics"),
}
# vllm serve's Namespace as make_arg_parser builds it: what replica/server.py sets on it.
SERVE_ARGS = ("enable_log_requests", "reasoning_parser", "structured_outputs_config")

# Needed by every replica, whatever its flags.
ALWAYS: tuple[Need, ...] = (
    ARG_PARSER, ENGINE_ARGS, FROM_CLI_ARGS, CREATE_ENGINE_CONFIG, USAGE_CONTEXT, PARALLEL_CONFIG,
    MODEL_CONFIG, CACHE_CONFIG, STRUCTURED_OUTPUTS, ASYNC_LLM, FROM_VLLM_CONFIG, GENERATE, OUTPUT_PROCESSOR,
    SAMPLING_PARAMS, TOKENS_PROMPT)


def needs(engine_metrics: bool, batch_limits: str, device: str) -> list[tuple[Need, str]]:
    """Every internal a replica with these settings uses (the layout's own pieces aside), each
    with what the operator can do without it."""
    listed = [(need, "") for need in ALWAYS]
    if batch_limits == "offline" and device == "cuda":
        listed += [(BATCH_DEFAULTS, BATCH_LIMITS_SERVE), (LLM_CLASS_CONTEXT, BATCH_LIMITS_SERVE)]
    if engine_metrics:
        listed += [(STAT_LOGGER, ENGINE_METRICS_OFF)]
        listed += [(need, ENGINE_METRICS_OFF) for need in METRIC_WRAPPERS.values()]
    return listed


def check(engine_metrics: bool, batch_limits: str, device: str) -> list[str]:
    """Problems with the installed vLLM for replicas with these settings (empty when none):
    each internal they need that is missing, for the deploy to refuse before reserving GPUs."""
    try:
        vllm_version()
    except VllmIncompatible as err:
        return [str(err)]
    # One problem per missing thing: a missing module or class fails every need inside it.
    found: dict[str, str] = {}
    listed = [(need, "") for need in LAYOUTS[layout()].values()]
    for need, remedy in listed + needs(engine_metrics, batch_limits, device):
        try:
            resolve(need, remedy)
        except VllmIncompatible as err:
            found.setdefault(err.missing, str(err))
    if not found:  # the parser is built from the pieces above
        try:
            _check_serve_args(serve_arg_parser(exit_on_error=False).parse_args(["--model", "m"]))
        except VllmIncompatible as err:
            found[err.missing] = str(err)
    return list(found.values())


# ---- vllm serve's arguments and OpenAI app ----------------------------------------------------


def layout() -> str:
    """The key of LAYOUTS the installed vLLM has."""
    vllm_version()
    return "launchers" if importlib.util.find_spec(LAUNCHERS_PACKAGE) is not None else "openai"


def _entrypoint(name: str) -> Callable[..., Any]:
    return resolve(LAYOUTS[layout()][name])


def serve_arg_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    """`vllm serve`'s own argument parser (its flags and option groups)."""
    parser_class = resolve(ARG_PARSER)
    make_arg_parser = _entrypoint("make_arg_parser")
    return make_arg_parser(parser=parser_class(prog="vllm serve", exit_on_error=exit_on_error))


def _check_serve_args(args: argparse.Namespace) -> None:
    missing = [name for name in SERVE_ARGS if not hasattr(args, name)]
    if missing:
        raise _incompatible(", ".join(f"vllm serve's argument {name}" for name in missing))
    resolve(STRUCTURED_OUTPUTS)
    if not hasattr(args.structured_outputs_config, "reasoning_parser"):
        raise _incompatible("vllm serve's argument structured_outputs_config.reasoning_parser")


def set_request_logging(args: argparse.Namespace, enabled: bool) -> None:
    """vLLM's own request log (it carries the prompt text) on or off."""
    _check_serve_args(args)
    args.enable_log_requests = enabled


def set_reasoning_parser(args: argparse.Namespace, parser: str) -> None:
    """vLLM's reasoning parser by name: init_app_state reads the structured-outputs copy, the
    engine the flag's."""
    _check_serve_args(args)
    args.reasoning_parser = parser
    args.structured_outputs_config.reasoning_parser = parser


async def build_openai_app(engine: Any, args: argparse.Namespace) -> Any:
    """vLLM's FastAPI app over an engine this process already runs, as `vllm serve` builds it."""
    build_app = _entrypoint("build_app")
    init_app_state = _entrypoint("init_app_state")
    _entrypoint("terminate_if_errored")  # checked, not called: the stand-in below is for it
    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args=args, supported_tasks=supported_tasks, model_config=engine.model_config)
    await init_app_state(engine_client=engine, state=app.state, args=args,
                         supported_tasks=supported_tasks)
    # vLLM's engine-error handler (terminate_if_errored) tells the HTTP server it runs under to
    # exit; here Serve owns the server (and replaces the replica through check_health), so a
    # stand-in takes the call.
    app.state.server = types.SimpleNamespace(should_exit=False)
    return app


# ---- the engine ---------------------------------------------------------------------------------


def engine_arg_fields() -> set[str]:
    """The names AsyncEngineArgs takes (what --engine-kwargs may set)."""
    return {f.name for f in dataclasses.fields(resolve(ENGINE_ARGS))}


def engine_args_from_cli(args: argparse.Namespace) -> Any:
    """vLLM's AsyncEngineArgs from `vllm serve`'s Namespace (every field, flag or not)."""
    resolve(ENGINE_ARGS)
    return resolve(FROM_CLI_ARGS)(args=args)


def create_engine_config(engine_args: Any) -> Any:
    """The VllmConfig `vllm serve` would build from these arguments."""
    resolve(CREATE_ENGINE_CONFIG)
    return engine_args.create_engine_config(usage_context=resolve(USAGE_CONTEXT).OPENAI_API_SERVER)


ENV_VARIABLES = Need("vllm.envs", "environment_variables",
                     use="VLLM_RAY_BUNDLE_INDICES: a data-parallel rank's bundles of its gang")
BUNDLE_INDICES_ENV = "VLLM_RAY_BUNDLE_INDICES"


def set_worker_bundles(indices: list[int]) -> None:
    """vLLM's Ray executor places this process's workers in these bundles of the placement
    group, in this order (vLLM reads the variable when it starts its workers)."""
    import os

    if BUNDLE_INDICES_ENV not in resolve(ENV_VARIABLES):
        raise _incompatible(f"vllm.envs.{BUNDLE_INDICES_ENV} ({ENV_VARIABLES.use})", "",
                            BUNDLE_INDICES_ENV)
    os.environ[BUNDLE_INDICES_ENV] = ",".join(map(str, indices))


def set_placement_group(vllm_config: Any, placement_group: Any) -> None:
    """vLLM's Ray executor places its workers in this group instead of creating its own."""
    resolve(PARALLEL_CONFIG)
    vllm_config.parallel_config.placement_group = placement_group


def apply_batch_defaults(engine_args: Any, world_size: int) -> None:
    """The batch limits vLLM picks for its offline `LLM` class, where the arguments set none.
    A vLLM whose get_batch_defaults changed is an error (the operator asked for these limits)."""
    get_defaults = resolve(BATCH_DEFAULTS, BATCH_LIMITS_SERVE)
    llm_class = resolve(LLM_CLASS_CONTEXT, BATCH_LIMITS_SERVE).LLM_CLASS
    tokens, seqs = get_defaults(world_size=world_size)
    if engine_args.max_num_batched_tokens is None and llm_class in tokens:
        engine_args.max_num_batched_tokens = tokens[llm_class]
    if engine_args.max_num_seqs is None and llm_class in seqs:
        engine_args.max_num_seqs = seqs[llm_class]


def start_engine(vllm_config: Any, engine_args: Any, stat_loggers: list | None) -> Any:
    """vLLM's AsyncLLM as `vllm serve` starts it, with these stat loggers (None: vLLM's own)."""
    from_vllm_config = resolve(FROM_VLLM_CONFIG)
    resolve(ASYNC_LLM)
    engine = from_vllm_config(
        vllm_config=vllm_config, usage_context=resolve(USAGE_CONTEXT).OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats, stat_loggers=stat_loggers)
    try:
        check_engine(engine)
    except VllmIncompatible:
        engine.shutdown()
        raise
    return engine


def check_engine(engine: Any) -> None:
    """The attributes of a running engine the replica reads (set in its __init__, so only an
    instance has them)."""
    resolve(MODEL_CONFIG)
    resolve(CACHE_CONFIG)
    resolve(OUTPUT_PROCESSOR)
    for name in ("model_config", "output_processor", "vllm_config"):
        if not hasattr(engine, name):
            raise _incompatible(f"{ASYNC_LLM.name}.{name} on a running engine")


async def generate_greedy(engine: Any, prompt_token_ids: list[int], max_tokens: int,
                          request_id: str) -> None:
    """Generate up to max_tokens tokens greedily after these prompt tokens, discarding them."""
    sampling_params = resolve(SAMPLING_PARAMS)
    tokens_prompt = resolve(TOKENS_PROMPT)
    resolve(GENERATE)
    params = sampling_params(max_tokens=max_tokens, temperature=0.0)
    async for _ in engine.generate(prompt=tokens_prompt(prompt_token_ids=prompt_token_ids),
                                   sampling_params=params, request_id=request_id):
        pass


# What the replica reads of a running engine (check_engine and ALWAYS checked that it has them).


def engine_errored(engine: Any) -> bool:
    return bool(engine.errored)


def engine_dead_error(engine: Any) -> BaseException | None:
    return engine.dead_error


def max_model_len(engine: Any) -> int:
    return int(engine.model_config.max_model_len)


def kv_cache_tokens(engine: Any) -> int:
    """Tokens the engine's KV cache holds: the blocks vLLM allocated after its memory profile
    (its "GPU KV cache size"), sent back from the engine core to the front end."""
    cache = engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks or 0) * int(cache.block_size)


def unfinished_requests(engine: Any) -> int:
    """Requests the engine still holds."""
    return int(engine.output_processor.get_num_unfinished_requests())


def shutdown_engine(engine: Any) -> None:
    engine.shutdown()


def count_aborts(engine: Any, aborted: Callable[[], None]) -> None:
    """Call `aborted` on every abort the engine is asked for (a client that went away, a
    cancelled stream): vLLM's app aborts through engine.abort."""
    abort = engine.abort

    async def counted(*args: Any, **kwargs: Any) -> Any:
        aborted()
        return await abort(*args, **kwargs)

    engine.abort = counted


# ---- engine metrics -----------------------------------------------------------------------------



def ray_stat_logger() -> type:
    """vLLM's RayPrometheusStatLogger, with the wrapper hooks labelled_stat_logger overrides."""
    base = resolve(STAT_LOGGER, ENGINE_METRICS_OFF)
    for need in METRIC_WRAPPERS.values():
        resolve(need, ENGINE_METRICS_OFF)
    return base


def labelled_stat_logger(base: type, extra: dict[str, str],
                         gauge_set: Callable[[Any, dict, float], None] | None = None) -> type:
    """A subclass of `base` (a vLLM Prometheus stat logger) whose gauges, counters and histograms
    declare and fill the `extra` labels; with `gauge_set`, its gauges record through
    gauge_set(metric, tags, value) instead of metric.set. A class
    without metric wrappers has nothing to label and comes back as it is; one whose wrappers lack
    the hooks is VllmIncompatible."""
    present = [name for name in METRIC_WRAPPERS if hasattr(base, name)]
    if not present:
        return base
    wrappers = {}
    for name, need in METRIC_WRAPPERS.items():
        wrapper = getattr(base, name, None)
        missing = [m for m in need.members if wrapper is None or not hasattr(wrapper, m)]
        if missing:
            raise _incompatible(", ".join(f"{base.__name__}.{name}.{m}" for m in missing)
                                + f" ({need.use})", ENGINE_METRICS_OFF)
        wrappers[name] = _labelled_wrapper(wrapper, extra,
                                           gauge_set if name == "_gauge_cls" else None)
    return type("Labelled" + base.__name__, (base,), wrappers)


# vLLM's wrappers add this key to every metric themselves (Serve's replica ID).
_VLLM_OWN_TAG = "ReplicaId"


def _labelled_wrapper(wrapper: Any, extra: dict[str, str],
                      gauge_set: Callable[[Any, dict, float], None] | None = None) -> type:
    """A subclass of one of vLLM's Ray metric wrappers that declares and fills `extra`'s keys.

    Ray drops tags that were not declared when the metric was created, so the keys must go in
    at construction (`_get_tag_keys`); `labels()` builds a labelled copy's tags through
    `_build_tags`; set/inc/observe record with `self._tags` on `self.metric`."""
    extra_keys = tuple(extra)
    base_keys = wrapper._get_tag_keys

    class Labelled(wrapper):
        @staticmethod
        def _get_tag_keys(labelnames):
            return tuple(base_keys(labelnames)) + extra_keys

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            tags = getattr(self, "_tags", None)
            if not hasattr(getattr(self, "metric", None), "_tag_keys") or not isinstance(tags, dict):
                raise _incompatible(f"{wrapper.__name__}.metric._tag_keys and "
                                    f"{wrapper.__name__}._tags (--engine-metrics)",
                                    ENGINE_METRICS_OFF)
            # Unlabelled metrics record with self._tags: every declared key needs a value.
            self._tags = {**tags, **extra}

        def _build_tags(self, *labels: Any, **labelskwargs: Any) -> dict[str, str]:
            if labels:
                # vLLM's positional check counts declared keys; map positionals to the
                # metric's own label names (declared first) before it runs.
                own = [k for k in self.metric._tag_keys
                       if k not in extra_keys and k != _VLLM_OWN_TAG]
                if len(labels) != len(own):
                    raise ValueError(f"expected {len(own)} label values, got {len(labels)}")
                labelskwargs.update(zip(own, labels))
            tags = wrapper._build_tags(self, **labelskwargs)
            tags.update(extra)
            return tags

    cls: type = Labelled
    if gauge_set is not None:
        class Gauge(Labelled):
            # vLLM's set_to_current_time goes through set too.
            def set(self, value: float) -> None:
                gauge_set(self.metric, self._tags, value)

        cls = Gauge
    cls.__name__ = cls.__qualname__ = "Labelled" + wrapper.__name__
    return cls

