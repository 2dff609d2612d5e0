"""Redeploying ray-placement-group.py's backends one at a time: what each runs (its Serve user_config) and the stages."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from common.placement import NodePin

# The key of a backend's user_config under which it records what it was deployed with. Serve
# keeps a deployment's user_config in its own state, so a later run reads it back from there.
RECORD_KEY = "deployed"


@dataclass(frozen=True)
class RunningBackend:
    """A backend as it runs: the version it was deployed at and the node it is pinned to."""

    version: str
    pin: NodePin


def backend_record(version: str, pin: NodePin) -> dict[str, Any]:
    """A backend's user_config: its version and pin, for the next run of the script."""
    return {RECORD_KEY: {"version": version, "pin": dataclasses.asdict(pin)}}


def running_backend(user_config: Any) -> RunningBackend | None:
    """What a backend's user_config says it runs (None: no record, e.g. deployed by an older
    version of this project)."""
    record = user_config.get(RECORD_KEY) if isinstance(user_config, dict) else None
    if not isinstance(record, dict):
        return None
    try:
        return RunningBackend(str(record["version"]), NodePin(**record["pin"]))
    except (TypeError, KeyError):
        return None


def current_pin(pin: NodePin, nodes: Sequence[Any]) -> NodePin | None:
    """`pin` on the alive node it matches now (a node that restarted has a new ID but keeps its
    labels and IP); None when no alive node matches."""
    for node in nodes:
        if not node.alive:
            continue
        matches = {"label": (node.labels or {}).get(pin.key) == pin.value,
                   "ip": node.ip == pin.value,
                   "node-id": node.node_id == pin.value}[pin.kind]
        if matches:
            return dataclasses.replace(pin, node_id=node.node_id)
    return None


def running_backends(app_name: str, count: int) -> list[RunningBackend | None]:
    """What each of the application's `count` backends (LLMBackend0...) runs now, read from
    Serve's state; [] when the application does not run with exactly that many."""
    from common.cluster import deployment_user_configs

    configs = deployment_user_configs(app_name)
    names = [f"LLMBackend{index}" for index in range(count)]
    if {name for name in configs if name.startswith("LLMBackend")} != set(names):
        return []
    return [running_backend(configs[name]) for name in names]


def kept_pins(running: Sequence[RunningBackend | None], nodes: Sequence[Any],
              pin_label: str | None = None) -> list[NodePin] | None:
    """The running backends' pins, each on its node now, when every backend runs with a record
    and sits on an alive node of its own, pinned as `pin_label` asks (by that label, or by
    anything without one); None otherwise (the script picks nodes afresh)."""
    recorded = [r for r in running if r is not None]
    if not running or len(recorded) < len(running):
        return None
    if pin_label and any((r.pin.kind, r.pin.key) != ("label", pin_label) for r in recorded):
        return None
    pins = [pin for r in recorded if (pin := current_pin(r.pin, nodes)) is not None]
    if len(pins) < len(recorded) or len({p.node_id for p in pins}) < len(pins):
        return None
    return pins


def stage_versions(old: Sequence[str], new: str) -> list[tuple[int, list[str]]]:
    """The stages of a redeploy to `new`: one per backend whose version changes, in order, as
    (that backend's index, every backend's version once it moved); the backends not reached yet
    keep theirs. [] when none changes (the update is in place)."""
    versions = list(old)
    stages = []
    for index, version in enumerate(old):
        if version != new:
            versions[index] = new
            stages.append((index, list(versions)))
    return stages
