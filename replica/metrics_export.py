"""Exports vLLM engine metrics from a Serve replica through Ray's metrics API, labelled per replica."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

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


class GaugeRefresher:
    """Sets each gauge series again, at its last value, every `period_s`. Ray's metrics agent
    drops a gauge series that a process did not export again within two export intervals, and a
    process exports only what was set since its last export; vLLM sets its gauges as the engine
    steps, so an idle engine's (requests running and waiting, KV cache usage, cache config info)
    would vanish from /metrics, check_cluster.py and dashboards until its next request."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._lock = threading.Lock()
        self._last: dict[tuple[int, tuple], tuple[Any, dict, float]] = {}
        self._thread: threading.Thread | None = None

    def set(self, metric: Any, tags: dict, value: float) -> None:
        """metric.set(value, tags), remembered for refresh(); the refresher thread starts with
        the first series."""
        with self._lock:  # a refresh never writes an older value over this one
            metric.set(value, tags=tags)
            self._last[(id(metric), tuple(sorted(tags.items())))] = (metric, dict(tags), value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gauge-refresher",
                                                daemon=True)
                self._thread.start()

    def refresh(self) -> None:
        with self._lock:
            for metric, tags, value in self._last.values():
                metric.set(value, tags=tags)

    def _run(self) -> None:
        failing = False
        while True:
            time.sleep(self.period_s)
            try:
                self.refresh()
                failing = False
            except Exception:
                if not failing:  # once per outage, not every period
                    logger.exception("refreshing the engine's gauges failed; retrying every "
                                     "%.1f s", self.period_s)
                failing = True


def labelled_stat_logger(base: type) -> type:
    """vLLM's RayPrometheusStatLogger (replica.vllm_compat.ray_stat_logger) with EXTRA_TAG_KEYS on
    its gauges, counters and histograms, and its gauges kept exported while the engine idles
    (GaugeRefresher, twice per export interval). The subclassing
    of vLLM's metric wrappers is the vLLM seam's (replica/vllm_compat.py): a vLLM whose wrappers
    differ is an error there, not metrics quietly missing these labels."""
    from replica import ray_compat, vllm_compat

    tags = replica_tags()
    extra = {key: tags[key] for key in EXTRA_TAG_KEYS}
    refresher = GaugeRefresher(ray_compat.metrics_export_interval_s() / 2)
    return vllm_compat.labelled_stat_logger(base, extra, refresher.set)
