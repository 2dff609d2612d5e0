"""Why a replica did not start: the engine's own root cause from the replica's log, on whichever node it ran, and the remedy."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from common.cluster import REPLICA_CLASS_PREFIX
from replica.config import EngineConfig

LOG_TAIL_LINES = 400
# The last line of a Python traceback: "SomeError: message" (optionally module-qualified).
_ERROR_LINE = re.compile(r"^(?:.*\] )?(?P<error>(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|"
                         r"Exit)): (?P<message>.+)$")
# Lines that wrap the cause rather than state it: Serve's and vLLM's re-raises.
_WRAPPERS = (
    "Engine core initialization failed",
    "RuntimeError: Traceback",
    "the vLLM engine started but failed its first generation",
    "initialize_and_get_metadata",
)
_KV_TOO_SMALL = re.compile(r"max seq len \((?P<wanted>\d+)\).*estimated maximum model length is "
                           r"(?P<fits>\d+)")
_NO_CACHE_BLOCKS = re.compile(r"No available memory for the cache blocks")
_TORCH_OOM = re.compile(r"Tried to allocate (?P<asked>[\d.]+) (?P<unit>[GM])iB.*?total capacity of "
                        r"(?P<total>[\d.]+) GiB of which (?P<free>[\d.]+) (?P<free_unit>[GM])iB is free")


@dataclass
class StartFailure:
    """One replica that died while starting, and the cause its log gives."""

    deployment: str
    actor_id: str
    node_id: str | None
    cause: str | None                       # "ValueError: ..." or None when the log had none
    remedies: list[str] = field(default_factory=list)


def root_cause(log_lines: Iterable[str]) -> str | None:
    """The error that stopped the engine: the last traceback line that is not a wrapper."""
    cause = None
    for raw in log_lines:
        line = _strip_ansi(raw.rstrip())
        match = _ERROR_LINE.match(line)
        if match and not any(w in line for w in _WRAPPERS):
            cause = f"{match['error']}: {match['message']}"
    return cause


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _gib(amount: str, unit: str) -> float:
    return float(amount) / (1024 if unit == "M" else 1)


def remedies_for(cause: str, engine: EngineConfig | None) -> list[str]:
    """The guide's remedies for a memory failure, with numbers for this model where the cause
    gives them (README: 故障排除)."""
    out: list[str] = []
    known = engine is not None
    engine = engine or EngineConfig()
    if match := _KV_TOO_SMALL.search(cause):
        fits = int(match["fits"])
        out.append(f"--max-model-len {fits} (or less) fits the KV cache the engine had; requests "
                   "then get at most that many tokens")
        if not known:
            out.append("or more room for the KV cache: a higher --gpu-memory-utilization "
                       "(--kv-cache-memory-bytes on CPU), --kv-cache-dtype fp8, or more GPUs per "
                       "replica (--tensor-parallel-size auto)")
        elif engine.device == "cpu":
            out.append("--kv-cache-memory-bytes larger than "
                       f"{engine.kv_cache_memory_bytes or 0} keeps --max-model-len {match['wanted']}")
        else:
            out.append(f"more room for the KV cache: --gpu-memory-utilization above "
                       f"{engine.gpu_memory_utilization:g}, --kv-cache-dtype fp8, or more GPUs per "
                       "replica (--tensor-parallel-size auto)")
    elif _NO_CACHE_BLOCKS.search(cause):
        out.append(f"the weights and activations fill --gpu-memory-utilization "
                   f"{engine.gpu_memory_utilization:g}: raise it, or spread the model over more "
                   "GPUs (--tensor-parallel-size auto --pipeline-parallel-size auto)")
    elif match := _TORCH_OOM.search(cause):
        asked, total = _gib(match["asked"], match["unit"]), float(match["total"])
        free = _gib(match["free"], match["free_unit"])
        # vLLM sizes the KV cache to fill --gpu-memory-utilization; what it allocates after
        # that (graphs, workspaces) must fit in the rest: leave the shortfall plus a margin.
        short = asked - free + 1.0
        lower = int((engine.gpu_memory_utilization - short / total) * 100) / 100
        if not known:
            out.append(f"--gpu-memory-utilization at least {short / total:.2f} lower than it "
                       f"was leaves the {asked:g} GiB it asked for ({free:g} GiB free of "
                       f"{total:g} GiB)")
        elif lower > 0.5:
            out.append(f"--gpu-memory-utilization {lower:.2f} leaves the {asked:g} GiB it asked "
                       f"for with {free:g} GiB free of {total:g} GiB (now "
                       f"{engine.gpu_memory_utilization:g})")
        out.append("or a shorter --max-model-len / smaller --max-num-batched-tokens (less "
                   "activation memory), or more GPUs per replica (--tensor-parallel-size auto)")
    return out


class LogsUnreadable(Exception):
    """Ray's state API (served by the dashboard) could not list the replicas or read logs."""


def replica_start_failures(app: str, engine: EngineConfig | None = None,
                           limit: int = 3) -> list[StartFailure]:
    """The replicas of `app` that died, newest first (at most `limit`), each with the cause its
    worker's log gives. Reads logs through Ray's state API from whichever node ran them;
    LogsUnreadable when that API does not answer (a cluster started without the dashboard)."""
    import ray
    from ray.util.state import get_log, list_actors

    address = ray.get_runtime_context().gcs_address
    prefix = f"{REPLICA_CLASS_PREFIX}{app}:"
    try:
        actors = list_actors(address=address, filters=[("state", "=", "DEAD")], detail=True,
                             limit=10000, raise_on_missing_output=False)
    except Exception as exc:  # the state API raises several types: one message for all
        raise LogsUnreadable(f"{type(exc).__name__}: {exc}") from exc
    dead = [a for a in actors if str(getattr(a, "class_name", "")).startswith(prefix)]
    dead.sort(key=lambda a: getattr(a, "end_time_ms", 0) or 0, reverse=True)
    failures = []
    for actor in dead[:limit]:
        lines: list[str] = []
        for suffix in ("err", "out"):
            lines += _log_tail(get_log, address, actor.actor_id, suffix)
        cause = root_cause(lines) or _death_cause(actor)
        failures.append(StartFailure(
            deployment=str(actor.class_name)[len(prefix):], actor_id=actor.actor_id,
            node_id=getattr(actor, "node_id", None), cause=cause,
            remedies=remedies_for(cause, engine) if cause else []))
    return failures


def _log_tail(get_log: Any, address: str, actor_id: str, suffix: str) -> list[str]:
    try:
        chunks = get_log(address=address, actor_id=actor_id, tail=LOG_TAIL_LINES,
                         suffix=suffix, timeout=10)
        return "".join(chunks).splitlines()   # chunks of the file, not lines
    except Exception:  # noqa: BLE001 - best effort: a node gone or a log rotated leaves the
        # other sources (the other suffix, the death cause) to say what happened
        return []


def _death_cause(actor: Any) -> str | None:
    context = (getattr(actor, "death_cause", None) or {})
    for key in ("actor_died_error_context", "creation_task_failure_context"):
        message = (context.get(key) or {}).get("error_message")
        if message:
            return root_cause(str(message).splitlines()) or str(message).splitlines()[-1]
    return None


def explain_failed_start(app: str, engine: EngineConfig | None) -> str:
    """The text a failed deploy appends: each dead replica's cause and remedy, or why the logs
    could not be read (then where to look)."""
    try:
        return format_failures(replica_start_failures(app, engine))
    except LogsUnreadable as exc:
        return (f"\nthe replicas' logs could not be read through Ray's state API ({exc}); "
                "their causes are in the worker logs of each node (logs/worker-*.err of the "
                "Ray session, or the dashboard's Logs view)")


def failures_as_data(app: str) -> list[dict[str, Any]] | dict[str, str]:
    """check_cluster.py --json: each dead replica's cause, or why none could be read."""
    try:
        return [vars(f) for f in replica_start_failures(app)]
    except LogsUnreadable as exc:
        return {"error": f"logs not readable through Ray's state API: {exc}"}


def format_failures(failures: list[StartFailure]) -> str:
    """The failures grouped by deployment and cause (Serve retries a replica several times,
    usually for the same reason)."""
    if not failures:
        return ""
    groups: dict[tuple[str, str | None], list[StartFailure]] = {}
    for failure in failures:
        groups.setdefault((failure.deployment, failure.cause), []).append(failure)
    lines = ["", "why the replicas did not start (from their logs):"]
    for (deployment, cause), members in groups.items():
        nodes = ", ".join(sorted({(f.node_id or "?")[:12] for f in members}))
        count = f"{len(members)} replica(s)" if len(members) > 1 else "replica"
        lines.append(f"  {deployment}, {count} on node {nodes}: "
                     f"{cause or 'no error in its log (see the node Ray logs)'}")
        lines += [f"    remedy: {r}" for r in members[0].remedies]
    return "\n".join(lines)
