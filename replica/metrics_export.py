"""Exports vLLM engine metrics from a Serve replica through Ray's metrics API, labelled per replica."""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ray.serve")

# Labels added to every vLLM engine metric, named like Serve's own (`application`, `deployment`)
# so that engine and request metrics join in PromQL. vLLM itself adds `ReplicaId` (Serve's
# replica ID, the `replica` label of ray_serve_* metrics), `model_name` and `engine`; Ray adds
# `NodeAddress`, `WorkerId` and `SessionName`.
EXTRA_TAG_KEYS = ("application", "deployment", "NodeId")
_WRAPPER_ATTRS = ("_gauge_cls", "_counter_cls", "_histogram_cls")


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
    except Exception:  # noqa: BLE001
        pass
    return tags


def _labelled_wrapper(wrapper: type, extra: dict[str, str]) -> type | None:
    """A subclass of one of vLLM's Ray metric wrappers that declares and fills EXTRA_TAG_KEYS.

    Ray drops tags that were not declared when the metric was created, so the keys must go in
    at construction. This relies on the wrapper's `_get_tag_keys`/`_build_tags`/`_tags` (vLLM
    0.11 to 0.32 at least); None when they are missing, and the caller keeps vLLM's own."""
    if not all(hasattr(wrapper, name) for name in ("_get_tag_keys", "_build_tags")):
        return None
    base_keys = wrapper._get_tag_keys

    class Labelled(wrapper):  # type: ignore[misc, valid-type]
        @staticmethod
        def _get_tag_keys(labelnames):
            return tuple(base_keys(labelnames)) + EXTRA_TAG_KEYS

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # Unlabelled metrics record with self._tags: every declared key needs a value.
            self._tags = {**getattr(self, "_tags", {}), **extra}

        def _build_tags(self, *labels: Any, **labelskwargs: Any) -> dict[str, str]:
            if labels:
                # vLLM's positional check counts declared keys; map positionals to the
                # metric's own label names (declared first) before it runs.
                own = [k for k in self.metric._tag_keys
                       if k not in EXTRA_TAG_KEYS and k != "ReplicaId"]
                if len(labels) != len(own):
                    raise ValueError(f"expected {len(own)} label values, got {len(labels)}")
                labelskwargs.update(zip(own, labels))
            tags = wrapper._build_tags(self, **labelskwargs)
            tags.update(extra)
            return tags

    Labelled.__name__ = Labelled.__qualname__ = "Labelled" + wrapper.__name__
    return Labelled


def labelled_stat_logger(base: type) -> type:
    """vLLM's RayPrometheusStatLogger with EXTRA_TAG_KEYS on its gauges, counters and
    histograms; `base` itself where this vLLM's wrappers look different (then the metrics carry
    vLLM's and Ray's labels only, which still name the replica and node)."""
    if not all(hasattr(base, name) for name in _WRAPPER_ATTRS):
        return base
    extra = replica_tags()
    wrappers = {name: _labelled_wrapper(getattr(base, name), extra) for name in _WRAPPER_ATTRS}
    if any(w is None for w in wrappers.values()):
        logger.info("engine metrics without application/deployment labels: this vLLM's Ray "
                    "metric wrappers differ from the ones this project knows")
        return base
    return type("Labelled" + base.__name__, (base,), dict(wrappers))
