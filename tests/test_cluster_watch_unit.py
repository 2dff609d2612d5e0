"""Tests check_cluster.py --watch's frame (ops/cluster_watch.py) on a made-up cluster report, and its loop off a TTY."""
from __future__ import annotations

import io

from common.cli import EXIT_OK
from common.cluster import ClusterReport, NodeInfo, PendingDemand, ReplicaInfo
from ops.cluster_watch import in_flight_per_replica, watch, watch_frame
from ops.metrics_scrape import ReplicaEngineStats, parse

HEAD, WORKER = "h" * 56, "w" * 56


def report() -> ClusterReport:
    nodes = [NodeInfo(HEAD, "10.0.0.1", True, True, 8, 6, 8, 0),
             NodeInfo(WORKER, "10.0.0.2", True, False, 8, 8, 8, 8)]
    replicas = [ReplicaInfo("deepseek", "LLMDeployment", "r1", "RUNNING", HEAD, "10.0.0.1", "a", 1),
                ReplicaInfo("deepseek", "LLMDeployment", "r2", "PENDING_CREATION", None, None,
                            None, None)]
    pending = [PendingDemand(shape={"GPU": 16.0}, count=1, kind="actor/task", strategy=None,
                             reason="needs 16 GPU on one node; largest: 8 GPU (infeasible)")]
    return ClusterReport(nodes=nodes, apps={}, replicas=replicas, placement_groups=[],
                         pending=pending, warnings=["replica deepseek/LLMDeployment#r2 is PENDING"],
                         healthy=False, ingress="haproxy")


def test_frame_shows_gpus_replicas_per_node_pending_and_in_flight():
    engine = {"r1": ReplicaEngineStats(replica="r1", running=3, waiting=1)}
    text = watch_frame(report(), {"r1": 4.0}, engine, "HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER  UNHEALTHY"
    head_row = next(line for line in lines if line.startswith("hhhhhhhhhhhh") and "10.0.0.1" in line)
    assert "8/8" in head_row and "2/8" in head_row and head_row.split()[-1] == "1"
    worker_row = next(line for line in lines if line.startswith("wwwwwwwwwwww"))
    assert "0/8" in worker_row and worker_row.split()[-1] == "0"
    running = next(line for line in lines if " r1 " in line)
    assert running.split()[-3:] == ["RUNNING", "4", "3/1"]
    unplaced = next(line for line in lines if " r2 " in line)
    assert unplaced.startswith("(unplaced)") and "PENDING_CREATION" in unplaced
    assert "needs 16 GPU on one node" in text and "GPU: 16" in text
    assert "! replica deepseek/LLMDeployment#r2 is PENDING" in text


def test_frame_without_metrics_shows_dashes():
    running = next(line for line in watch_frame(report(), None, None, "H").splitlines()
                   if " r1 " in line)
    assert running.split()[-2:] == ["-", "-"]


def test_in_flight_from_serve_gauge():
    samples = parse('ray_serve_replica_processing_queries{application="a",deployment="D",'
                    'replica="r1"} 5.0\n'
                    'ray_serve_replica_processing_queries{application="a",deployment="D",'
                    'replica="r2"} 0.0\n'
                    'ray_vllm_num_requests_running{ReplicaId="r1"} 3.0\n')
    assert in_flight_per_replica(samples) == {"r1": 5.0, "r2": 0.0}


def test_plain_frames_off_a_tty_and_ctrl_c_exits_zero():
    seen = []

    def frame(app, spread, header):
        seen.append(header)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return f"frame {len(seen)}"

    out = io.StringIO()
    assert watch("deepseek", set(), 0.01, stream=out, frame=frame) == EXIT_OK
    assert out.getvalue() == "frame 1\n\nframe 2\n\n"
    assert "refresh 1" in seen[0] and "refresh 2" in seen[1]


def test_a_restarted_head_is_said_and_a_dead_worker_is_a_problem():
    from common.cluster import dead_node_warnings
    from common.cluster_format import format_report

    old_head = NodeInfo("o" * 56, "10.0.0.1", False, True, 8, 0, 8, 0)
    new_head = NodeInfo(HEAD, "10.0.0.1", True, True, 8, 8, 8, 8)
    dead_worker = NodeInfo(WORKER, "10.0.0.2", False, False, 8, 0, 8, 0)
    [(said, problem)] = dead_node_warnings([new_head, old_head], "redis")
    assert not problem and "the head restarted" in said and "reloaded from Redis" in said
    [(said, problem)] = dead_node_warnings([new_head, dead_worker], "redis")
    assert problem and "is DEAD" in said
    # No alive head: a dead head is a dead cluster, not a restart.
    assert dead_node_warnings([old_head], "memory")[0][1] is True
    view = report()
    view.gcs_storage = "memory"
    assert "GCS: state in the head's memory (fault tolerance off" in format_report(view)
    view.gcs_storage = "redis"
    assert "GCS: state in Redis (fault tolerance on" in format_report(view)
