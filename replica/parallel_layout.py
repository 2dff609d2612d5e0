"""Which GPU bundle of a replica's placement group becomes which vLLM rank, and whether each tensor-parallel group stays on one node.

vLLM's Ray executor (RayExecutorV2, the default of vLLM 0.26 and 0.32:
`vllm/v1/executor/ray_utils.py: get_bundles_sorted_by_node`) starts one worker per GPU bundle and
gives ranks in this order: the bundles on the engine's (driver's) node first, then the other
nodes by node ID, bundle order kept within a node. Rank r belongs to pipeline stage r // TP. The
legacy executor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) sorts by node IP instead, also keeping a
node's workers together. Under both, every tensor-parallel group sits on one node exactly when
each node holds a multiple of TP of the replica's GPU bundles.
"""
from __future__ import annotations

from typing import Any, Sequence

# The replica's tensor-parallel size, in its runtime_env, so that check_cluster.py can name the
# pipeline stage of each bundle (the placement group table knows only bundles and nodes).
TP_ENV = "REPLICA_TENSOR_PARALLEL_SIZE"


def gpu_bundle_ranks(bundles: Sequence[dict[str, Any]], bundle_nodes: Sequence[str | None],
                     driver_node: str | None) -> list[int]:
    """Indices of the GPU bundles in vLLM's rank order (rank i is the i-th entry)."""
    gpu = [i for i, bundle in enumerate(bundles) if float(bundle.get("GPU", 0) or 0) > 0]
    return sorted(gpu, key=lambda i: (bundle_nodes[i] != driver_node, bundle_nodes[i] or ""))


def stages_per_node(bundles: Sequence[dict[str, Any]], bundle_nodes: Sequence[str | None],
                    driver_node: str | None, tensor_parallel_size: int) -> dict[str, list[int]]:
    """Node -> the pipeline stages whose ranks it holds, in rank order."""
    out: dict[str, list[int]] = {}
    for rank, index in enumerate(gpu_bundle_ranks(bundles, bundle_nodes, driver_node)):
        stages = out.setdefault(bundle_nodes[index] or "(unplaced)", [])
        if rank // tensor_parallel_size not in stages:
            stages.append(rank // tensor_parallel_size)
    return out


def split_groups(bundles: Sequence[dict[str, Any]], bundle_nodes: Sequence[str | None],
                 tensor_parallel_size: int) -> list[str]:
    """The nodes whose share of the replica's GPU bundles is no multiple of TP: there a
    tensor-parallel group would span nodes (an empty list when none does)."""
    counts: dict[str, int] = {}
    for bundle, node in zip(bundles, bundle_nodes):
        if float(bundle.get("GPU", 0) or 0) > 0:
            counts[node or "(unplaced)"] = counts.get(node or "(unplaced)", 0) + 1
    return [f"node {node[:12]} holds {count} GPU bundle(s), not a multiple of "
            f"tensor_parallel_size {tensor_parallel_size}"
            for node, count in sorted(counts.items()) if count % tensor_parallel_size]
