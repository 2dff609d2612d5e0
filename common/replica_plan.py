"""Planning a deployment's replicas (pure): what one replica needs, where a replica larger than a node puts its stages, how many replicas the cluster holds and how many to run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from common import cli, replica_layout
from common.placement import stable_pins
from common.replica_layout import MultiNodeLayout
from replica.config import EngineConfig, ServeConfig

AUTO = "auto"


@dataclass(frozen=True)
class Topology:
    """What a deployment script declares about its replicas (from its flags)."""

    # A count, or "auto": as many as the cluster's nodes hold, at most max_replicas.
    replicas: int | str = 1
    max_replicas: int | None = None
    # "auto" where no GPU decides (CPU engines): this many.
    auto_default: int | None = None
    # Serve's autoscaling_config; `replicas` is then its upper bound.
    autoscaling: dict[str, Any] | None = None
    # At most this many replicas on one node (Serve's max_replicas_per_node).
    replicas_per_node: int | None = None
    # Every replica on a node of its own.
    one_per_node: bool = False
    # A replica larger than any node spans nodes, one pipeline stage per node; False: refused.
    span_nodes: bool = True
    # The node label that pins a spanning replica's stages (else their IPs, else node IDs).
    pin_label: str | None = None
    # The share of one GPU each replica takes (below 1: several replicas on one GPU).
    gpu_share: float = 1.0
    # Lines the deploy prints about this topology.
    notes: tuple[str, ...] = ()


@dataclass
class ReplicaPlan:
    """A topology planned against the cluster's nodes."""

    replicas: int                    # to run; with autoscaling, the most
    demand: dict[str, float]         # one replica (or its first stage) on one node
    slots: int                       # replicas the cluster's nodes hold
    per_node: int | None = None      # Serve's max_replicas_per_node
    autoscaling: dict[str, Any] | None = None
    gpu_share: float = 1.0           # of one GPU, per replica of one GPU
    layout: MultiNodeLayout | None = None
    notes: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)
    # Data-parallel ranks per gang (--data-parallel-size): `replicas` and `slots` count gangs,
    # each gang that many Serve replicas placed and restarted together.
    gang_size: int = 1

    @property
    def stages(self) -> int:
        return self.layout.pipeline_parallel_size if self.layout else 1

    def deployment_topology(self) -> dict[str, Any]:
        """The deployment options this plan sets: the replica count (or autoscaling) and the
        per-node cap."""
        options: dict[str, Any] = ({"autoscaling_config": self.autoscaling} if self.autoscaling
                                   else {"num_replicas": self.replicas})
        if self.gang_size > 1:
            options = gang_topology(options, self.gang_size)
        elif self.per_node is not None:
            options["max_replicas_per_node"] = self.per_node
        return options

    def lines(self) -> list[str]:
        """What the deploy prints before deploying."""
        if self.gang_size > 1:
            return [f"{self.replicas} gang(s) of {self.gang_size} data-parallel ranks "
                    f"({self.replicas * self.gang_size} replicas), each rank needing "
                    f"{format_demand(self.demand)} on one node; a gang's ranks are placed "
                    f"together over as few nodes as hold them and restart together; the "
                    f"cluster's nodes can hold {self.slots} gang(s)", *self.notes]
        if self.stages > 1:
            gpus = f"{self.demand.get('GPU', 0):g}"
            needs = (f"{self.stages} pipeline stages of {gpus} GPUs, each stage on one node "
                     f"(e.g. {self.stages} nodes with {gpus} free GPUs each)")
        else:
            needs = f"{format_demand(self.demand)} on one node"
        cap = f", at most {self.per_node} per node" if self.per_node else ""
        out = [f"{self.replicas} replica(s), each needing {needs}{cap}; the cluster's nodes "
               f"can hold {self.slots}"]
        if self.layout is not None:
            out.append("each replica spans nodes, one pipeline stage per node, pinned "
                       f"{self.layout.pin_words()}:\n{self.layout.describe()}")
        return out + list(self.notes)


# Serve's gang scheduling (Ray >= 2.60): a gang's ranks are reserved in one placement group, packed
# onto as few nodes as hold them, and when one rank fails the whole gang restarts (a vLLM
# data-parallel group cannot lose a rank and go on).
GANG_PLACEMENT = "PACK"
GANG_FAILURE_POLICY = "RESTART_GANG"


def gang_topology(options: dict[str, Any], gang_size: int) -> dict[str, Any]:
    """Replica counts of gangs made counts of Serve replicas (autoscaling bounds too), with
    Serve's gang scheduling."""
    out = dict(options)
    if "autoscaling_config" in out:
        scaled = dict(out["autoscaling_config"])
        for key in ("min_replicas", "max_replicas", "initial_replicas"):
            if scaled.get(key) is not None:
                scaled[key] *= gang_size
        out["autoscaling_config"] = scaled
    else:
        out["num_replicas"] *= gang_size
    out["gang_scheduling_config"] = {"gang_size": gang_size,
                                     "gang_placement_strategy": GANG_PLACEMENT,
                                     "runtime_failure_policy": GANG_FAILURE_POLICY}
    return out


def format_demand(demand: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(demand.items()) if amount)


def check_gpu_share(engine: EngineConfig, share: float) -> None:
    """A replica on a share of one GPU: one GPU per replica, on a GPU, and a vLLM memory share
    that fits it (vLLM's --gpu-memory-utilization is of the whole GPU, and a replica that
    starts second finds only what the first left free)."""
    if share == 1.0:
        return
    if not 0.0 < share < 1.0:
        raise cli.ScriptError(f"--gpus-per-replica {share:g}: a share of one GPU, in (0, 1]",
                              cli.EXIT_USAGE)
    if engine.device != "cuda":
        raise cli.ScriptError("--gpus-per-replica shares GPUs: it needs --device cuda",
                              cli.EXIT_USAGE)
    if engine.gpu_memory_utilization > share:
        raise cli.ScriptError(
            f"--gpus-per-replica {share:g} puts {int(1 / share)} replica(s) on one GPU, each "
            f"with --gpu-memory-utilization {engine.gpu_memory_utilization:g} of its memory: "
            f"they cannot all start. Give --gpu-memory-utilization at most {share:g} (e.g. "
            f"{math.floor(share * 0.92 * 100) / 100:g}: model, KV cache and activations of one "
            "replica, as vLLM measures them)", cli.EXIT_USAGE)


def replica_demand(engine: EngineConfig, serve_config: ServeConfig,
                   spans_nodes: bool = False, gpu_share: float = 1.0) -> dict[str, float]:
    """What one replica needs on a single node; for a replica that spans nodes, what its first
    pipeline stage needs on its node (each other stage: its GPUs)."""
    if engine.device == "cpu":
        return {"CPU": serve_config.cpus_per_replica}
    gpus = engine.tensor_parallel_size if spans_nodes else engine.gpus_per_replica * gpu_share
    return {"CPU": serve_config.cpus_per_replica, "GPU": float(gpus)}


def per_node_cap(engine: EngineConfig, topology: Topology) -> int | None:
    """Serve's max_replicas_per_node for the topology. A replica with its own placement group
    (tensor/pipeline parallel) gets none: Serve refuses it beside placement_group_bundles, and
    such a replica's group fills the GPUs it takes anyway."""
    if engine.uses_ray_workers or engine.data_parallel_size > 1:
        # Serve refuses a per-node cap beside a gang too: the gang's group places its ranks.
        return None
    if topology.one_per_node:
        return 1
    return topology.replicas_per_node


def slots_on_node(node: dict[str, float], demand: dict[str, float]) -> int:
    """How many replicas with `demand` fit on one node's total resources."""
    counts = [math.floor(node.get(name, 0.0) / amount + 1e-9)
              for name, amount in demand.items() if amount > 0]
    return min(counts) if counts else 0


def replica_slots(demand: dict[str, float], replicas_per_node: int | None,
                  nodes: Sequence[dict[str, float]], stages: int = 1) -> int:
    """Replicas the nodes (their total resources) can hold, each node capped at
    `replicas_per_node`. With `stages` > 1 a replica is that many pipeline stages of `demand`
    (its GPUs on one node each, a node taking as many whole stages as it has room for; the
    CPUs on the first)."""
    if stages > 1:
        tp = max(int(demand.get("GPU", 0)), 1)
        amounts = {str(i): dict(node) for i, node in enumerate(nodes)}
        most = int(sum(node.get("GPU", 0.0) for node in nodes) // (tp * stages))
        return len(replica_layout.plan_stages(tp, stages, amounts, most, demand.get("CPU", 0.0)))
    total = 0
    for node in nodes:
        fit = slots_on_node(node, demand)
        total += min(fit, replicas_per_node) if replicas_per_node else fit
    return total


def resolve_replicas(requested: str | int, slots: int, max_replicas: int | None,
                     auto_default: int | None = None) -> int:
    """The replica count for a number or 'auto', or a usage ScriptError."""
    if str(requested).strip().lower() == AUTO:
        count = auto_default if auto_default is not None else min(slots, max_replicas or slots)
        if count < 1:
            raise cli.ScriptError("no node can hold even one replica; see "
                                  "`python check_cluster.py`", cli.EXIT_USAGE)
        return count
    try:
        count = int(requested)
    except ValueError:
        raise cli.ScriptError(f"--num-replicas must be a number or 'auto', got {requested!r}",
                              cli.EXIT_USAGE) from None
    if count < 1:
        raise cli.ScriptError("--num-replicas must be >= 1", cli.EXIT_USAGE)
    if max_replicas is not None and count > max_replicas:
        raise cli.ScriptError(f"--num-replicas {count} is above --max-replicas {max_replicas}",
                              cli.EXIT_USAGE)
    return count


def multi_node_layout(engine: EngineConfig, serve_config: ServeConfig, replicas: int,
                      alive: Sequence[Any], pin_label: str | None = None
                      ) -> MultiNodeLayout | None:
    """None when a replica fits one node (STRICT_PACK); else the nodes of each pipeline stage
    for up to `replicas` replicas (`alive`: common.cluster.NodeInfo of the alive nodes), chosen from the GPUs free
    now (or, when none fit now, from the nodes' totals: the replica then waits for what others
    hold), with the pins that hold the stages there across a node's restart."""
    if not engine.uses_ray_workers:
        return None
    largest = max((n.gpus_total for n in alive), default=0.0)
    if engine.gpus_per_replica <= largest:
        return None
    tp, pp = engine.tensor_parallel_size, engine.pipeline_parallel_size
    if tp > largest:
        raise cli.ScriptError(
            f"--tensor-parallel-size {tp} is more GPUs than any node has (largest: "
            f"{largest:g}); a tensor-parallel group must sit on one node. Span nodes with "
            f"--pipeline-parallel-size (e.g. --tensor-parallel-size {int(largest)} "
            f"--pipeline-parallel-size {-(-engine.gpus_per_replica // max(int(largest), 1))})",
            cli.EXIT_USAGE)
    cpus = serve_config.cpus_per_replica
    for amounts in ({n.node_id: {"GPU": n.gpus_available, "CPU": n.cpus_available}
                     for n in alive},
                    {n.node_id: {"GPU": n.gpus_total, "CPU": n.cpus_total} for n in alive}):
        plans = replica_layout.plan_stages(tp, pp, amounts, replicas, cpus)
        if plans:
            chosen = sorted({node for plan in plans for node in plan})
            pins = {pin.node_id: pin for pin in stable_pins(chosen, alive, pin_label)}
            return MultiNodeLayout(tp, pp, plans, pins)
    raise cli.ScriptError(
        f"a replica of tensor parallel {tp} x pipeline parallel {pp} needs {pp} stage(s) of "
        f"{tp} GPUs, each stage on one node; the cluster's nodes cannot hold them (see "
        f"`python check_cluster.py`)", cli.EXIT_USAGE)


def plan_replicas(engine: EngineConfig, serve_config: ServeConfig, topology: Topology,
                  nodes: Sequence[Any]) -> ReplicaPlan:
    """The topology planned against `nodes` (common.cluster.NodeInfo as read once by the
    caller; the dead ones are left out here):
    the layout of a replica larger than a node, the replicas the nodes hold, the count to run;
    a ScriptError for what cannot be deployed at all."""
    alive = [n for n in nodes if n.alive]
    per_node = per_node_cap(engine, topology)
    totals = [{"CPU": n.cpus_total, "GPU": n.gpus_total} for n in alive]
    auto = str(topology.replicas).strip().lower() == AUTO
    wanted = None if auto else resolve_replicas(topology.replicas, 0, topology.max_replicas)
    largest = max((n.gpus_total for n in alive), default=0.0)
    if engine.uses_ray_workers and engine.gpus_per_replica > largest and not topology.span_nodes:
        raise cli.ScriptError(
            f"a replica of {engine.gpus_per_replica} GPUs is larger than any node, and this "
            "script keeps each replica on one node: use ray-force-multi.py, which spreads a "
            "replica's pipeline stages over nodes", cli.EXIT_USAGE)
    layout = multi_node_layout(engine, serve_config, wanted or topology.max_replicas or 1,
                               alive, topology.pin_label)
    demand = replica_demand(engine, serve_config, layout is not None, topology.gpu_share)
    stages = layout.pipeline_parallel_size if layout else 1
    gang = engine.data_parallel_size
    slots = replica_slots(demand, per_node, totals, stages) // gang
    count = wanted if wanted is not None else resolve_replicas(
        AUTO, slots, topology.max_replicas, topology.auto_default)
    plan = ReplicaPlan(replicas=count, demand=demand, slots=slots, per_node=per_node,
                       autoscaling=topology.autoscaling, layout=layout, notes=topology.notes,
                       gpu_share=topology.gpu_share, gang_size=gang)
    what = "gang(s)" if gang > 1 else "replica(s)"
    if slots < count:
        plan.warnings.append(
            f"only {slots} of {count} {what} fit the cluster's nodes; the rest will stay "
            f"pending, and the wait ends with an error after --timeout "
            f"{serve_config.timeout_s:.0f}s")
    return plan


def offline_plan(engine: EngineConfig, serve_config: ServeConfig,
                 topology: Topology) -> ReplicaPlan:
    """The plan where no cluster is read (a Serve config written ahead): the count as given."""
    if str(topology.replicas).strip().lower() == AUTO:
        raise cli.ScriptError("--num-replicas auto is resolved against a cluster: give a number",
                              cli.EXIT_USAGE)
    count = resolve_replicas(topology.replicas, 0, topology.max_replicas)
    return ReplicaPlan(replicas=count,
                       demand=replica_demand(engine, serve_config, gpu_share=topology.gpu_share),
                       slots=count, per_node=per_node_cap(engine, topology),
                       autoscaling=topology.autoscaling, notes=topology.notes,
                       gpu_share=topology.gpu_share, gang_size=engine.data_parallel_size)
