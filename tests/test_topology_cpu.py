"""Every deployment script with the real vLLM CPU engine on a simulated 2-node cluster, over HTTP.

`--device cpu` keeps each script's placement guarantees while reserving CPUs instead of GPUs.
Each worker node declares one CPU, so a replica (1 CPU) has a node to itself, like a TP=8
replica on an 8-GPU node.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading

from _cluster_fixtures import LOCAL_IP, simulated_cluster  # noqa: F401  (sets env first)

import pytest  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from ray import serve  # noqa: E402

from _serve_fixtures import cpu_args, deploy_script, wait_until  # noqa: E402
from common import cluster  # noqa: E402

URL = f"http://{LOCAL_IP}:8000"


@pytest.fixture(scope="module")
def sim():
    with simulated_cluster(gpu_nodes=2, head_cpus=0, worker_cpus=1) as (c, workers):
        yield c, workers


def worker_nodes() -> set:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def args(app: str, *extra: str) -> list[str]:
    return [*cpu_args(8000, "--tensor-parallel-size", "1", "--max-model-len", "2048"),
            "--app-name", app, "--route-prefix", f"/{app}", *extra]


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


def test_force_multi_cpu_two_replicas_two_nodes_answering(sim, capsys):
    assert deploy_script("ray-force-multi.py", *args("force")) == 0
    print(capsys.readouterr().out)
    replicas = running("force")
    assert len(replicas) == 2 and {r.node_id for r in replicas} == worker_nodes()
    seen = set()
    wait_until(lambda: seen.add(generate("force")["node"]) or seen == worker_nodes(),
               timeout=60, interval=0, what="answers from both nodes")
    serve.delete("force")


def test_placement_group_cpu_backends_on_two_nodes_router_alternates(sim, capsys):
    assert deploy_script("ray-placement-group.py", *args("pg")) == 0
    print(capsys.readouterr().out)
    backends = running("pg", "LLMBackend")
    assert len(backends) == 2 and {r.node_id for r in backends} == worker_nodes()
    answers = answers_from("pg", 10)
    assert sorted(answers.values()) == [5, 5] and set(answers) == worker_nodes()
    serve.delete("pg")


def test_single_gpu_cpu_replicas_capped_per_node(sim, capsys):
    assert deploy_script("ray-single-gpu.py", *args(
        "single", "--num-replicas", "2", "--replicas-per-node", "1")) == 0
    print(capsys.readouterr().out)
    replicas = running("single")
    assert len(replicas) == 2 and {r.node_id for r in replicas} == worker_nodes()
    assert generate("single")["node"] in worker_nodes()
    serve.delete("single")


def test_product_cpu_scales_out_to_the_other_node_under_load(sim, capsys):
    assert deploy_script("ray-product", *args(
        "product", "--target-ongoing-requests", "1", "--upscale-delay", "1",
        "--downscale-delay", "5", "--max-ongoing-requests", "8")) == 0
    print(capsys.readouterr().out)
    first = running("product")
    assert len(first) == 1
    stop = threading.Event()
    nodes_answering: set = set()

    def keep_busy():
        while not stop.is_set():
            nodes_answering.add(generate("product", max_tokens=256)["node"])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(keep_busy) for _ in range(4)]
        try:
            replicas = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(
                running("product")), timeout=180, what="second replica")
            wait_until(lambda: nodes_answering == worker_nodes(), timeout=60,
                       what="answers from the new replica")
        finally:
            stop.set()
        for future in futures:
            future.result()
    assert {r.node_id for r in replicas} == worker_nodes()
    wait_until(lambda: len(cluster.list_replicas("product")) == 1, timeout=180,
               what="scale back to one replica")
    serve.delete("product")
