"""Tests check_cluster.py and common/cluster.py against a real simulated 3-node Ray cluster."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from _cluster_fixtures import ROOT, subprocess_env, wait_until

import ray
from ray import serve

import check_cluster
from common import cluster as cluster_mod
from common.cli import EXIT_OK, EXIT_RAY_UNREACHABLE, EXIT_UNHEALTHY
from common.cluster_format import format_placement


@serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 8, "num_cpus": 0})
class WhereAmI:
    def __call__(self, *args):
        return ray.get_runtime_context().get_node_id()


# Only the first GPU node carries "rack_a", so a deployment asking for it is forced there.
SIMULATED_CLUSTER = {"worker_resources": [{"rack_a": 4}, {}]}


def run_json(capsys, *argv: str):
    code = check_cluster.main(["--json", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_healthy_cluster_shows_nodes_and_replica_placement(sim, capsys):
    c, workers = sim
    handle = serve.run(WhereAmI.bind(), name="placement", route_prefix="/placement")
    # The replicas tell us themselves where they run; routing is random, so ask until both answer.
    seen = set()
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(handle.remote().result(timeout_s=30))
    assert len(seen) == 2

    code, report = run_json(capsys, "--address", c.address)
    assert code == EXIT_OK, report["warnings"]
    assert report["healthy"] is True
    assert report["ingress"] == "haproxy"  # the scripts' default, started by the fixture
    assert report["gcs_storage"] == "memory"  # no Redis: the head must not die

    nodes = {n["node_id"]: n for n in report["nodes"]}
    worker_ids = {w.node_id for w in workers}
    assert set(nodes) == worker_ids | {c.head_node.node_id}
    assert nodes[c.head_node.node_id]["is_head"] and nodes[c.head_node.node_id]["gpus_total"] == 0
    for wid in worker_ids:
        assert nodes[wid]["gpus_total"] == 8 and nodes[wid]["gpus_available"] == 0
        assert nodes[wid]["alive"] and not nodes[wid]["is_head"]
        assert nodes[wid]["gpu_model"] == "H100"
        assert nodes[wid]["ip"] == "127.0.0.1"

    replicas = [r for r in report["replicas"] if r["app"] == "placement"]
    assert len(replicas) == 2
    assert {r["state"] for r in replicas} == {"RUNNING"}
    assert {r["node_id"] for r in replicas} == seen == worker_ids
    assert all(r["resources"].get("GPU") == 8 for r in replicas)

    assert report["apps"]["placement"]["status"] == "RUNNING"
    assert report["apps"]["placement"]["deployments"]["WhereAmI"]["replica_states"] == {"RUNNING": 2}
    assert report["pending"] == []

    # The human-readable form names every node and replica.
    assert check_cluster.main(["--address", c.address]) == EXIT_OK
    text = capsys.readouterr().out
    with capsys.disabled():  # shown with -s: the table an operator would see
        print(text)
    for nid in worker_ids | {c.head_node.node_id}:
        assert cluster_mod.short_id(nid) in text
    assert "HEALTHY" in text and "placement/WhereAmI" in text


def _read_terminal(fd: int, until, timeout: float) -> str:
    """What a program wrote to its pseudo-terminal, ANSI codes stripped, until `until(text)`."""
    raw = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the program exited and closed the terminal
                break
            if not chunk:
                break
            raw += chunk
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))
        if until(text):
            return text
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))


def test_watch_refreshes_in_a_terminal_and_ctrl_c_exits_zero(sim):
    c, workers = sim
    pg = ray.util.placement_group([{"GPU": 5}, {"GPU": 5}], strategy="STRICT_PACK", name="watch10")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "check_cluster.py"), "--address",
                             c.address, "--watch", "1"], stdin=terminal, stdout=terminal,
                            stderr=terminal, env={**subprocess_env(), "TERM": "xterm",
                                                  "PYTHONFAULTHANDLER": "1"}, cwd=ROOT,
                            # Ctrl-C as in a terminal, even where the test runner itself was
                            # started in the background (which leaves SIGINT ignored, and so
                            # no KeyboardInterrupt in Python).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(terminal)
    try:
        # Two refreshes, the second one with the pending group's reason.
        text = _read_terminal(controller, lambda t: re.search(
            r"refresh [2-9].*10 GPU.*\n.*\n", t.split("refresh 1", 1)[-1], re.S), timeout=90)
        assert "refresh 2" in text, text[-3000:]
        proc.send_signal(signal.SIGINT)
        # Keep draining the terminal until the program exits (the read fails once it has
        # closed the terminal): a program that writes its last frame into a full terminal
        # buffer nobody reads would block there.
        text += _read_terminal(controller, lambda t: False, timeout=60)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:  # still running: its threads' stacks say where
            proc.send_signal(signal.SIGABRT)
            text += _read_terminal(controller, lambda t: False, timeout=5)
            raise AssertionError("no exit 70 s after Ctrl-C:\n" + text[-6000:]) from None
        assert code == EXIT_OK, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(controller)
        ray.util.remove_placement_group(pg)
    print(text[-4000:])
    assert "Traceback" not in text
    assert "GPU USED/TOTAL" in text and "REPLICAS BY NODE" in text
    for worker in workers:
        row = next(line for line in text.splitlines()
                   if line.startswith(cluster_mod.short_id(worker.node_id)) and "alive" in line)
        assert "8/8" in row, row   # the placement app's replica holds all 8 GPUs
    assert "placement/WhereAmI" in text and "RUNNING" in text
    assert "STRICT_PACK" in text and "10 GPU" in text


def test_one_run_reads_each_kind_of_ray_state_once(sim, capsys, monkeypatch):
    import ray
    import ray._private.state
    import ray.autoscaler.v2.sdk as sdk

    calls = {"nodes": 0, "cluster_status": 0, "actors": 0}

    def counting(kind, real):
        def call(*args, **kwargs):
            calls[kind] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(ray, "nodes", counting("nodes", ray.nodes))
    monkeypatch.setattr(sdk, "get_cluster_status",
                        counting("cluster_status", sdk.get_cluster_status))
    monkeypatch.setattr(ray._private.state, "actors", counting("actors", ray._private.state.actors))
    code, report = run_json(capsys, "--address", sim[0].address)
    assert report["nodes"] and code in (EXIT_OK, EXIT_UNHEALTHY)
    # One snapshot: "free" and "total" of every node come from the same moment.
    assert calls == {"nodes": 1, "cluster_status": 1, "actors": 1}, calls


def test_impossible_deployment_is_pending_with_reason(sim, capsys):
    c, _ = sim

    # A replica that never started has nothing to drain: don't wait Serve's default 20 s on delete.
    @serve.deployment(num_replicas=1, ray_actor_options={"num_gpus": 16, "num_cpus": 0},
                      graceful_shutdown_timeout_s=1, graceful_shutdown_wait_loop_s=0.5)
    class TooBig:
        def __call__(self, *args):
            return "never"

    serve._run(TooBig.bind(), name="toobig", route_prefix="/toobig", _blocking=False)
    try:
        def pending_reported():
            code, report = run_json(capsys, "--address", c.address)
            gpu16 = [p for p in report["pending"] if p["shape"].get("GPU") == 16]
            return (code, report, gpu16) if gpu16 else None

        code, report, demands = wait_until(pending_reported, timeout=40)
        assert code == EXIT_UNHEALTHY and report["healthy"] is False
        reason = demands[0]["reason"]
        assert demands[0]["kind"] == "actor/task"
        assert "16 GPU" in reason and "8 GPU" in reason and "infeasible" in reason

        replica = next(r for r in report["replicas"] if r["app"] == "toobig")
        assert replica["state"] == "PENDING_CREATION" and replica["node_id"] is None
        assert any("toobig/TooBig" in w and "16 GPU" in w for w in report["warnings"])

        # --app filters the Serve part but pending demands stay visible.
        code, filtered = run_json(capsys, "--address", c.address, "--app", "toobig")
        assert code == EXIT_UNHEALTHY
        assert {r["app"] for r in filtered["replicas"]} == {"toobig"}
        assert set(filtered["apps"]) == {"toobig"}

        assert check_cluster.main(["--address", c.address]) == EXIT_UNHEALTHY
        text = capsys.readouterr().out
        with capsys.disabled():
            print(text)
        assert "PENDING" in text and "needs 16 GPU on one node" in text
    finally:
        serve.delete("toobig")
    code, report = wait_until(lambda: (lambda r: r if r[0] == EXIT_OK else None)(
        run_json(capsys, "--address", c.address)), timeout=30)
    assert report["pending"] == []


def test_pending_placement_group_names_strategy_and_free_gpus(sim, capsys):
    c, _ = sim
    serve.delete("placement")  # frees 8 GPUs on each node
    pg = ray.util.placement_group([{"GPU": 5}, {"GPU": 5}], strategy="STRICT_PACK", name="needs10")
    try:
        def pg_pending():
            code, report = run_json(capsys, "--address", c.address)
            hits = [p for p in report["pending"] if p["kind"] == "placement_group"]
            # The deleted app's GPUs come back a moment after serve.delete returns.
            idle = any("idle" in w for w in report["warnings"])
            return (code, report, hits) if hits and idle else None

        code, report, hits = wait_until(pg_pending, timeout=30)
        assert code == EXIT_UNHEALTHY
        assert hits[0]["strategy"] == "STRICT_PACK" and hits[0]["shape"] == {"GPU": 10}
        assert "STRICT_PACK" in hits[0]["reason"] and "10 GPU" in hits[0]["reason"]
        group = next(g for g in report["placement_groups"] if g["name"] == "needs10")
        assert group["state"] == "PENDING" and group["bundle_nodes"] == [None, None]
        # 16 GPUs sit idle while this waits: the report says so.
        assert any("idle" in w for w in report["warnings"])
    finally:
        ray.util.remove_placement_group(pg)


def test_warns_when_multi_replica_deployment_sits_on_one_node(sim, capsys):
    c, workers = sim

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0, "resources": {"rack_a": 1}})
    class Pinned:
        def __call__(self, *args):
            return ray.get_runtime_context().get_node_id()

    serve.run(Pinned.bind(), name="pinned", route_prefix="/pinned")
    try:
        code, report = wait_until(lambda: (lambda r: r if not r[1]["pending"] else None)(
            run_json(capsys, "--address", c.address)), timeout=30)
        reps = [r for r in report["replicas"] if r["app"] == "pinned"]
        assert {r["node_id"] for r in reps} == {workers[0].node_id}
        spread = [w for w in report["warnings"] if "pinned/Pinned" in w and "one node" in w]
        assert spread and cluster_mod.short_id(workers[0].node_id) in spread[0]
    finally:
        serve.delete("pinned")


def test_format_placement_table(sim):
    replicas = [cluster_mod.ReplicaInfo("app", "Dep", "r1", "RUNNING", "a" * 56, "10.0.0.1", "x", 1,
                                        {"GPU": 8.0, "CPU": 0.5}),
                cluster_mod.ReplicaInfo("app", "Dep", "r2", "PENDING_CREATION", None, None, None, None,
                                        {"GPU": 8.0})]
    text = format_placement(replicas)
    lines = text.splitlines()
    assert lines[0].split() == ["DEPLOYMENT", "REPLICA", "STATE", "NODE", "NODE", "IP", "RESOURCES",
                                "GPUS", "PER", "NODE"]
    assert "aaaaaaaaaaaa" in lines[1] and "10.0.0.1" in lines[1] and "GPU: 8" in lines[1]
    assert "PENDING_CREATION" in lines[2]


def test_unreachable_address_exits_3_fast_without_traceback():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "check_cluster.py"), "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, env=subprocess_env(), cwd=ROOT)
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_RAY_UNREACHABLE, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "127.0.0.1:1" in proc.stderr and "ray start --head" in proc.stderr
    assert elapsed < 20


def test_model_flag_adds_the_planned_layout(sim, capsys):
    r1 = os.path.join(ROOT, "tests", "fixtures", "deepseek-r1")
    code, data = run_json(capsys, "--model", r1, "--gpu-memory-gib", "80")
    layout = data["layout"]
    assert (layout["tensor_parallel_size"], layout["pipeline_parallel_size"]) == (8, 2)
    assert layout["replicas"] == 1 and layout["sequences"] >= 2 and layout["node_problems"] == []
    # Wide expert parallelism beside it: 16 ranks of 1 GPU do not hold R1 on 80 GiB GPUs.
    assert layout["wide_ep"]["pick"] == "tp-pp" and not layout["wide_ep"]["dp_ep"]["fits"]
    check_cluster.main(["--model", r1, "--gpu-memory-gib", "141"])
    out = capsys.readouterr().out
    assert "LAYOUT, wide expert parallelism vs tensor parallelism on 16 GPUs:" in out
    assert "--data-parallel-size 16 --enable-expert-parallel" in out and "pick: DP x EP" in out
    check_cluster.main(["--model", r1, "--gpu-memory-gib", "64"])
    out = capsys.readouterr().out
    assert "LAYOUT: no layout on 2 node(s) x 8 GPU(s) of 64 GiB" in out and "3 nodes" in out
