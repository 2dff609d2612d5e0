"""Exports vLLM engine metrics from a Serve replica through Ray's metrics API, labelled per replica."""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("ray.serve")


class MetricRecorder:
    """Records Ray metric points on a daemon thread, in the order they were submitted.

    vLLM observes a histogram for every streamed token on the replica's event loop; Ray's
    `record` spends most of its time converting the tags and then in C++ with the GIL released,
    so on a thread of its own it runs while the loop waits on sockets, and the loop only pays a
    deque append. A loop that never idles starves the thread: the first time `warn_pending`
    points wait it says so in the replica log, and points beyond `max_pending` are dropped and
    counted rather than growing memory without bound."""

    def __init__(self, max_pending: int = 200_000, warn_pending: int = 10_000,
                 idle_sleep_s: float = 0.005):
        self._pending: collections.deque = collections.deque()
        self._max_pending = max_pending
        self._warn_pending = warn_pending
        self._warned = False
        self._idle_sleep_s = idle_sleep_s
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.dropped = 0
        self.failed = 0

    def submit(self, record: Callable[..., Any], value: float, tags: dict[str, str]) -> None:
        pending = len(self._pending)
        if pending >= self._warn_pending and not self._warned:
            self._warned = True
            logger.warning("engine metrics: the recorder thread is %d points behind (the event "
                           "loop seldom idles); metrics lag until it catches up", pending)
        if pending >= self._max_pending:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("engine metrics: %d points waiting for the recorder thread; "
                               "dropping new ones until it catches up", self._max_pending)
            return
        self._pending.append((record, value, tags))
        if self._thread is None:
            self._start()

    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> None:
        """Record everything submitted so far on the calling thread (tests, shutdown)."""
        pop = self._pending.popleft
        while True:
            try:
                record, value, tags = pop()
            except IndexError:
                return
            try:
                record(value, tags=tags)
            except Exception as exc:  # noqa: BLE001 - a bad point must not stop the others
                self.failed += 1
                if self.failed == 1:
                    logger.warning("engine metric point not recorded: %r", exc)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-metrics-recorder",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self.drain()
            time.sleep(self._idle_sleep_s)


RECORDER = MetricRecorder()

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
    except Exception:  # noqa: BLE001
        pass
    return tags


def labelled_stat_logger(base: type, recorder: MetricRecorder | None = None) -> type:
    """vLLM's RayPrometheusStatLogger (replica.vllm_compat.ray_stat_logger) with EXTRA_TAG_KEYS on
    its gauges, counters and histograms, recording through `recorder` if given. The subclassing
    of vLLM's metric wrappers is the vLLM seam's (replica/vllm_compat.py): a vLLM whose wrappers
    differ is an error there, not metrics quietly missing these labels."""
    from replica import vllm_compat

    tags = replica_tags()
    extra = {key: tags[key] for key in EXTRA_TAG_KEYS}
    return vllm_compat.labelled_stat_logger(base, extra,
                                            recorder.submit if recorder is not None else None)
