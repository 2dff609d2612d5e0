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


def _labelled_wrapper(wrapper: type, extra: dict[str, str],
                      recorder: MetricRecorder | None = None) -> type | None:
    """A subclass of one of vLLM's Ray metric wrappers that declares and fills EXTRA_TAG_KEYS,
    and records through `recorder` when one is given.

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

    if recorder is not None:
        # vLLM's wrappers call the Ray metric's own set/inc/observe with self._tags; the same
        # call goes to the recorder thread instead.
        if hasattr(wrapper, "observe"):
            def observe(self, value):
                recorder.submit(self.metric.observe, value, self._tags)
            Labelled.observe = observe
        if hasattr(wrapper, "inc"):
            def inc(self, value=1.0):
                if value:
                    recorder.submit(self.metric.inc, value, self._tags)
            Labelled.inc = inc
        if hasattr(wrapper, "set"):
            def set_(self, value):
                recorder.submit(self.metric.set, value, self._tags)
            Labelled.set = set_

    Labelled.__name__ = Labelled.__qualname__ = "Labelled" + wrapper.__name__
    return Labelled


def labelled_stat_logger(base: type, recorder: MetricRecorder | None = None) -> type:
    """vLLM's RayPrometheusStatLogger with EXTRA_TAG_KEYS on its gauges, counters and
    histograms, recording through `recorder` if given; `base` itself where this vLLM's wrappers
    look different (then the metrics carry vLLM's and Ray's labels only, which still name the
    replica and node, and are recorded inline)."""
    if not all(hasattr(base, name) for name in _WRAPPER_ATTRS):
        return base
    extra = replica_tags()
    wrappers = {name: _labelled_wrapper(getattr(base, name), extra, recorder)
                for name in _WRAPPER_ATTRS}
    if any(w is None for w in wrappers.values()):
        logger.info("engine metrics without application/deployment labels: this vLLM's Ray "
                    "metric wrappers differ from the ones this project knows")
        return base
    return type("Labelled" + base.__name__, (base,), dict(wrappers))
