"""Exports vLLM engine metrics from a Serve replica through Ray's metrics API, labelled per replica."""
from __future__ import annotations

import logging

logger = logging.getLogger("ray.serve")


# Labels added to every vLLM engine metric, named like Serve's own (`application`, `deployment`)
# so that engine and request metrics join in PromQL. vLLM itself adds `ReplicaId` (Serve's
# replica ID, the `replica` label of ray_serve_* metrics), `model_name` and `engine`; Ray adds
# `NodeAddress`, `WorkerId` and `SessionName`.
EXTRA_TAG_KEYS = ("application", "deployment", "NodeId")


def replica_tags() -> dict[str, str]:
    """Values of EXTRA_TAG_KEYS for the current process (empty strings outside Serve)."""
    tags = {"application": "", "deployment": "", "NodeId": ""}
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        tags["application"] = str(getattr(ctx, "app_name", "") or "")
        tags["deployment"] = str(getattr(ctx, "deployment", "") or "")
    except Exception:  # noqa: BLE001 - not in a replica (unit tests, offline use)
        pass
    try:
        import ray

        # is_initialized first: get_runtime_context() would start a local Ray otherwise.
        if ray.is_initialized():
            tags["NodeId"] = ray.get_runtime_context().get_node_id() or ""
    except Exception:  # noqa: BLE001 - a label left empty beats a replica that cannot start
        pass
    return tags


def labelled_stat_logger(base: type) -> type:
    """vLLM's RayPrometheusStatLogger (replica.vllm_compat.ray_stat_logger) with EXTRA_TAG_KEYS on
    its gauges, counters and histograms. The subclassing
    of vLLM's metric wrappers is the vLLM seam's (replica/vllm_compat.py): a vLLM whose wrappers
    differ is an error there, not metrics quietly missing these labels."""
    from replica import vllm_compat

    tags = replica_tags()
    extra = {key: tags[key] for key in EXTRA_TAG_KEYS}
    return vllm_compat.labelled_stat_logger(base, extra)
