"""The old HTTP path (`--ingress proxy`: Serve's Python proxy actor) with the real vLLM CPU engine
on a simulated 2-node cluster: a replica per node answering, the placement-group router, client
hang-ups aborting generations, and stop_service draining streams. The other modules run the
default (HAProxy); test_operator runs all four scripts on it with real `ray start` raylets.

`--device cpu` keeps each script's placement guarantees while reserving CPUs instead of GPUs.
Each worker node declares one CPU, so a replica (1 CPU) has a node to itself, like a TP=8
replica on an 8-GPU node.
"""
from __future__ import annotations

import collections
import json
import threading

from _cluster_fixtures import LOCAL_IP

import pytest
import ray
import requests
from ray import serve
from ray.serve.exceptions import RayServeException

import check_cluster
import load_test
import stop_service
from _serve_fixtures import cpu_args, deploy_script, send_and_hang_up, wait_until
from common import cluster

URL = f"http://{LOCAL_IP}:8000"


SIMULATED_CLUSTER = {"gpu_nodes": 2, "head_cpus": 0, "worker_cpus": 1, "ingress": "proxy"}


@pytest.fixture(autouse=True)
def apps_deleted_after(sim):
    """Each test deploys its own application; one a failed test leaves would hold the nodes'
    only CPUs and fail every later test here for that reason instead of its own."""
    yield
    try:
        apps = serve.status().applications
    except RayServeException:  # no Serve instance: nothing deployed
        return
    for app in apps:
        serve.delete(app)


def test_serve_runs_on_the_python_proxy_here(sim):
    assert cluster.serve_ingress() == "proxy"


def worker_nodes() -> set:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def args(app: str, *extra: str) -> list[str]:
    return [*cpu_args(8000, "--tensor-parallel-size", "1", "--max-model-len", "2048"),
            "--app-name", app, "--route-prefix", f"/{app}", "--ingress", "proxy", *extra]


def generate(app: str, max_tokens: int = 4) -> dict:
    response = requests.post(f"{URL}/{app}/", timeout=120,
                             json={"prompt": "请简要解释相对论", "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] <= max_tokens and body["object"] == "text_completion"
    return body


def running(app: str, deployment_prefix: str = "") -> list:
    return [r for r in cluster.list_replicas(app)
            if r.state == "RUNNING" and r.deployment.startswith(deployment_prefix)]


def answers_from(app: str, count: int) -> collections.Counter:
    return collections.Counter(generate(app)["node"] for _ in range(count))


def assert_stop_drains(app: str, streams: int, tokens: int = 256) -> None:
    """stop_service drains: streams already generating when it starts all finish in full, then
    the app is gone."""
    body = {"prompt": "hello", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    lines = [requests.post(f"{URL}/{app}/", json=body, timeout=300, stream=True).iter_lines()
             for _ in range(streams)]
    for it in lines:
        assert next(it).startswith(b"data: ")  # generating now
    assert stop_service.main(["--app", app, "--timeout", "120"]) == 0
    for it in lines:
        events = [line for line in it if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == tokens
    assert app not in serve.status().applications


def test_force_multi_cpu_two_replicas_two_nodes_answering(sim, capsys):
    assert deploy_script("ray-force-multi.py", *args("force")) == 0
    print(capsys.readouterr().out)
    replicas = running("force")
    assert len(replicas) == 2 and {r.node_id for r in replicas} == worker_nodes()
    seen = set()
    wait_until(lambda: seen.add(generate("force")["node"]) or seen == worker_nodes(),
               timeout=60, interval=0, what="answers from both nodes")
    # check_cluster names the same nodes and replicas, and calls the cluster healthy.
    capsys.readouterr()
    assert check_cluster.main(["--json", "--app", "force"]) == 0
    out = capsys.readouterr().out
    # Ray may interleave its own log lines on stdout; the report is the JSON object.
    report, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    assert {r["node_id"] for r in report["replicas"]} == worker_nodes()
    assert {r["replica_id"] for r in report["replicas"]} == {r.replica_id for r in replicas}
    assert worker_nodes() <= {n["node_id"] for n in report["nodes"]}
    assert_stop_drains("force", streams=2)


def backend_status(app: str) -> list[dict]:
    """Each backend's own GET /nodes, from its own server (where the router sends requests)."""
    statuses = []
    for name in ("LLMBackend0", "LLMBackend1"):
        url = serve.get_deployment_handle(name, app_name=app).endpoint.remote().result()
        answer = requests.get(f"{url}/nodes", timeout=30)
        assert answer.status_code == 200
        statuses.append(answer.json())
    return statuses


def backend_finished(app: str) -> int:
    """Requests the backends finished, from their own counters."""
    return sum(status["requests_served"] for status in backend_status(app))


def backends_aborted_all(app: str, before: int) -> bool:
    statuses = backend_status(app)
    return (sum(s["engine_aborted_requests"] for s in statuses) > before and
            sum(s["engine_unfinished_requests"] for s in statuses) == 0)


def test_placement_group_cpu_backends_on_two_nodes_router_alternates(sim, capsys, tmp_path):
    assert deploy_script("ray-placement-group.py", *args("pg")) == 0
    print(capsys.readouterr().out)
    backends = running("pg", "LLMBackend")
    assert len(backends) == 2 and {r.node_id for r in backends} == worker_nodes()
    answers = answers_from("pg", 10)
    assert sorted(answers.values()) == [5, 5] and set(answers) == worker_nodes()
    # load_test's per-node counts and balance match the router's known 50/50 split, and what
    # the backends themselves counted.
    finished_before = backend_finished("pg")
    out_file = tmp_path / "load.json"
    code = load_test.main(["--url", f"{URL}/pg", "-c", "2", "-n", "20", "--max-tokens", "4",
                           "--json", str(out_file), "--no-progress"])
    assert code == 0
    result = json.loads(out_file.read_text())
    assert sorted(n["count"] for n in result["nodes"]) == [10, 10]
    assert {n["node"] for n in result["nodes"]} == worker_nodes()
    assert result["summary"]["balance"] == 1.0
    assert backend_finished("pg") - finished_before == 20
    # A client that hangs up on the router ends the generation on the backend, streamed or not.
    for stream in (True, False):
        before = sum(s["engine_aborted_requests"] for s in backend_status("pg"))
        body = {"prompt": "hello", "max_tokens": 1900, "ignore_eos": True,
                **({"stream": True} if stream else {})}
        send_and_hang_up(f"{URL}/pg/", body, stream,
                         lambda: any(s["engine_unfinished_requests"] for s in backend_status("pg")))
        wait_until(lambda before=before: backends_aborted_all("pg", before), timeout=60,
                   what=f"the backend's engine request aborted (stream={stream})")
    # stop_service drains the backends' own servers too.
    assert_stop_drains("pg", streams=1)


def test_placement_group_redeploy_moves_one_backend_at_a_time(sim, capsys):
    """Run again with an engine change on a running application, ray-placement-group.py keeps the
    backends' nodes (each node's only CPU is held, like a node's GPUs by a TP=8 backend, so a
    fresh pick could never place) and replaces one backend at a time while the router stays:
    requests sent all through the redeploy are all answered."""
    assert deploy_script("ray-placement-group.py", *args("pgr")) == 0
    capsys.readouterr()
    before = {r.deployment: r.replica_id for r in running("pgr")}
    assert len(before) == 3
    answered: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            try:
                answered.append(generate("pgr")["node"])
            except Exception as exc:  # noqa: BLE001 - every failure is kept, then asserted on
                failed.append(repr(exc))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert deploy_script("ray-placement-group.py", *args("pgr", "--max-num-seqs", "32")) == 0
    finally:
        stop.set()
        sender.join()
    out = capsys.readouterr().out
    assert "its backends stay on their nodes" in out
    assert "step 1/2: backend 0 on the new version" in out
    assert "step 2/2: backend 1 on the new version" in out
    assert not failed and set(answered) == worker_nodes()
    after = {r.deployment: r.replica_id for r in running("pgr")}
    assert after["Router"] == before["Router"]
    assert all(after[name] != before[name] for name in ("LLMBackend0", "LLMBackend1"))
    # The same flags again: nothing to move, nothing restarts.
    assert deploy_script("ray-placement-group.py", *args("pgr", "--max-num-seqs", "32")) == 0
    assert "step 1/" not in capsys.readouterr().out
    assert {r.deployment: r.replica_id for r in running("pgr")} == after
    assert stop_service.main(["--app", "pgr", "--timeout", "120"]) == 0
