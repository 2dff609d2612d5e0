"""Shows a Ray cluster's nodes, Serve apps, replica placement, placement groups and pending demands, and why."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from common import cluster, startup_failures
from common.startup_failures import explain_failed_start
from common.cluster_format import format_report
from common.layout import add_gpu_memory_flag
from common.options import add_option_flags
from common.ray_connect import connect
from common.cli import (EXIT_FAILURE, EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, ScriptError,
                        add_address_flag, add_flag, exits_with_codes, make_parser, parse)
from replica.config import EngineConfig

EPILOG = """\
exit status: 0 healthy; 4 something is pending, unhealthy or dead; 3 Ray is not reachable.
With --watch: 0 when stopped with Ctrl-C.

Reading it when a replica stays PENDING: the PENDING section lists each resource request Ray
cannot place and why (e.g. "needs 8 GPU on one node; largest free: 3 GPU"). "infeasible" means
no node could ever hold it (lower tensor_parallel_size / num_gpus, or add bigger nodes);
"waiting for resources" means other replicas or placement groups hold what it needs.
"""
WATCH_DEFAULT_S = 2.0


def build_parser():
    parser = make_parser(__doc__, EPILOG)
    add_address_flag(parser)
    add_flag(parser, "--app", default=None,
             help="only show this Serve application (nodes and pending demands are always shown)")
    add_flag(parser, "--spread", action="append", default=None, metavar="DEPLOYMENT",
             help="deployment (name or app/name) expected to span several nodes even with one "
                  "replica per check; repeatable. Deployments with several replicas are always checked")
    add_flag(parser, "--json", type=bool, default=False,
             help="print the full report as JSON (for scripts) instead of tables")
    add_flag(parser, "--watch", env="CHECK_CLUSTER_WATCH", type=_positive_seconds, nargs="?",
             const=WATCH_DEFAULT_S, default=None, metavar="SECONDS",
             help=f"keep refreshing a live view every SECONDS ({WATCH_DEFAULT_S:g} when given "
                  "alone): nodes with GPUs used/total, replicas per node with their state and "
                  "requests in flight, pending demands and why; in place on a terminal, plain "
                  "frames otherwise; Ctrl-C exits 0")
    add_flag(parser, "--plan", env="PLAN_CONFIG", default=None, metavar="CONFIG",
             help="check a Serve config file (from a script's --print-config, or its RayService) "
                  "the way the scripts check before deploying: its builder args, the layout "
                  "against the GPUs, every GPU node's model folder and versions, the replicas "
                  "the nodes can hold; exit 0 when `serve deploy` can run it")
    layout = parser.add_argument_group(
        "layout (with --model: the tensor/pipeline layout `auto` would choose on this cluster)")
    # The deploy scripts' own declarations of these flags, with "not asked" defaults.
    add_option_flags(layout, EngineConfig, {"model": None, "max_model_len": None,
                                            "gpu_memory_utilization": 0.9},
                     only=["model", "max_model_len", "gpu_memory_utilization"])
    add_gpu_memory_flag(layout)
    return parser


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be positive")
    return value


_positive_seconds.__name__ = "positive number of seconds"


def _engine_summary(app: str | None, as_json: bool):
    """Live per-replica engine load from the nodes' metrics endpoints; informational only, so
    any failure to read them leaves the rest of the report (and the exit status) alone."""
    from ops import metrics_scrape

    try:
        if as_json:
            samples, _ = metrics_scrape.scrape_cluster(timeout=3.0)
            live = {r.replica_id for r in cluster.list_replicas(app)}
            return {k: vars(v) for k, v in metrics_scrape.per_replica(samples).items()
                    if k in live}
        return metrics_scrape.summary_for_cluster(app, timeout=3.0)
    except Exception as exc:  # noqa: BLE001 - informational: shown as not readable, report stands
        return None if as_json else f"ENGINE: metrics not readable ({type(exc).__name__}: {exc})"


def failed_apps(report: cluster.ClusterReport) -> list[str]:
    """Applications whose replicas failed to start or became unhealthy."""
    return sorted(name for name, app in report.apps.items()
                  if app["status"] in ("DEPLOY_FAILED", "UNHEALTHY"))


@exits_with_codes
def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if args.watch is not None and args.json:
        raise ScriptError("--watch shows tables; it does not combine with --json", EXIT_USAGE)
    connect(args.address)
    if args.plan:
        from ops.config_check import plan_config

        return plan_config(args.plan, args.gpu_memory_gib)
    if args.watch is not None:
        from ops.cluster_watch import watch

        return watch(args.app, set(args.spread or ()), args.watch)
    with cluster.state_snapshot():  # the report and the engine summary see the same moment
        try:
            report = cluster.collect_report(app=args.app,
                                            spread_deployments=set(args.spread or ()))
        except Exception as exc:  # noqa: BLE001 - operators need the reason, not a traceback
            print(f"error: could not read the cluster state: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return EXIT_FAILURE
        engine = _engine_summary(args.app, as_json=args.json)
    planned = None
    if args.model:
        from common.layout import plan_for_report

        planned = plan_for_report(args.model, args.gpu_memory_gib, args.max_model_len,
                                  args.gpu_memory_utilization)
    if args.json:
        data = cluster.report_to_dict(report)
        data["start_failures"] = {name: startup_failures.failures_as_data(name)
                                  for name in failed_apps(report)}
        data["engine_metrics"] = engine
        if planned is not None:
            data["layout"] = planned
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_report(report))
        for name in failed_apps(report):
            print(explain_failed_start(name, None))
        if engine:
            print("\n" + engine)
        if planned is not None:
            from common.layout import format_plan

            print("\n" + format_plan(planned))
    return EXIT_OK if report.healthy else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
