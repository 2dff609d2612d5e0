"""Where each script's replicas land on a simulated 2 x 8-GPU cluster (Ray placement only).

The engine is swapped for tests/_placement_probe.py here (a CPU cannot run tensor parallel 8);
the same scripts run the real engine on a simulated cluster in tests/test_topology_cpu.py.
"""
from __future__ import annotations

import collections
import concurrent.futures as concurrent_futures
import os
import signal
import time

from _cluster_fixtures import LOCAL_IP

import pytest
import ray
import requests
from ray import serve

import _placement_probe
from _serve_fixtures import (background_load, deploy_script, wait_for_replicas,
                             wait_until)
from common import cli
from common import cluster
from common.cluster_format import format_placement

URL = f"http://{LOCAL_IP}:8000"


# Logical CPUs only: enough that GPUs, not CPUs, decide placement.
SIMULATED_CLUSTER = {"gpu_nodes": 2, "head_cpus": 1, "worker_cpus": 16}


@pytest.fixture(autouse=True)
def probe(monkeypatch):
    _placement_probe.install(monkeypatch)


def gpu_args(app: str, *extra: str) -> list[str]:
    return ["--app-name", app, "--route-prefix", f"/{app}", "--host", LOCAL_IP, "--port", "8000",
            "--proxy-location", "HeadOnly", "--timeout", "120", "--model", "unused-by-probe",
            *extra]


def describe(app: str, **body) -> dict:
    response = requests.post(f"{URL}/{app}/", json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def running(app: str) -> list:
    return [r for r in cluster.list_replicas(app) if r.state == "RUNNING"]


def gpu_nodes() -> set:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def test_force_multi_two_tp8_replicas_on_two_nodes_16_gpus_not_32(sim, capsys):
    assert deploy_script("ray-force-multi.py", *gpu_args("force")) == 0
    replicas = running("force")
    assert len(replicas) == 2
    assert {r.node_id for r in replicas} == gpu_nodes()
    # Each replica's 8 tensor-parallel workers sit on the replica's own node, one GPU each.
    seen = {}
    for _ in range(20):
        info = describe("force")
        seen[info["node"]] = info
        if len(seen) == 2:
            break
    for node, info in seen.items():
        assert info["worker_nodes"] == [node] * 8
        assert len({g for gpus in info["worker_gpus"] for g in gpus}) == 8
        assert info["own_gpus"] == []  # the replica actor itself books no GPU
    # 16 GPUs reserved in the whole cluster, not 32 (nothing pending either).
    assert ray.cluster_resources()["GPU"] == 16
    assert ray.available_resources().get("GPU", 0) == 0
    assert cluster.pending_demands() == []
    out = capsys.readouterr().out
    assert "RUNNING with 2 replica(s)" in out
    print(out)  # the replica-to-node table, for the record
    serve.delete("force")


def test_force_multi_tp8_pp2_spans_both_nodes_one_stage_per_node(sim, capsys, monkeypatch):
    # The deploy shell's network settings reach every worker, on every node.
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    assert deploy_script("ray-force-multi.py", *gpu_args(
        "pp", "--num-replicas", "1", "--pipeline-parallel-size", "2")) == 0
    replicas = running("pp")
    assert len(replicas) == 1
    info = describe("pp")
    workers = info["worker_nodes"]  # in bundle (= stage) order
    assert len(workers) == 16 and len({g for gpus in info["worker_gpus"] for g in gpus}) == 8
    stage0, stage1 = set(workers[:8]), set(workers[8:])
    assert len(stage0) == 1 and len(stage1) == 1 and stage0 != stage1
    assert stage0 | stage1 == gpu_nodes()
    # The replica actor (bundle 0's CPU) is on stage 0's node: vLLM's driver ranks come first.
    assert info["node"] in stage0 and info["own_gpus"] == []
    assert info["worker_nccl_ifname"] == ["lo"] * 16
    assert ray.available_resources().get("GPU", 0) == 0 and cluster.pending_demands() == []
    table = format_placement(cluster.list_replicas("pp"))
    node0, node1 = cluster.short_id(next(iter(stage0))), cluster.short_id(next(iter(stage1)))
    assert f"node {node0}: 8 GPU (stage 0), node {node1}: 8 GPU (stage 1)" in table
    out = capsys.readouterr().out
    assert "2 pipeline stages of 8 GPUs" in out and "RUNNING with 1 replica(s)" in out
    print(out)  # the deploy output with the placement table, for the record
    serve.delete("pp")


def test_force_multi_that_cannot_fit_exits_with_the_pending_demand(sim, capsys):
    code = deploy_script("ray-force-multi.py", *gpu_args("toomany", "--num-replicas", "3"),
                         "--timeout", "10")
    err = capsys.readouterr().err
    assert code == cli.EXIT_TIMEOUT
    assert "not ready after 10s" in err and "GPU" in err and "8" in err
    serve.delete("toomany")


def test_single_gpu_16_replicas_8_per_node(sim):
    assert deploy_script("ray-single-gpu.py", *gpu_args("single")) == 0
    replicas = running("single")
    assert len(replicas) == 16
    per_node = collections.Counter(r.node_id for r in replicas)
    assert set(per_node.values()) == {8} and set(per_node) == gpu_nodes()
    assert ray.available_resources().get("GPU", 0) == 0
    serve.delete("single")


def test_single_gpu_replicas_on_half_a_gpu_share_it(sim):
    assert deploy_script("ray-single-gpu.py", *gpu_args(
        "half", "--num-replicas", "4", "--gpus-per-replica", "0.5",
        "--gpu-memory-utilization", "0.45", "--replicas-per-node", "2")) == 0
    replicas = running("half")
    assert len(replicas) == 4
    # Two replicas per node (the cap), each half a GPU: one GPU per node taken, not four.
    assert set(collections.Counter(r.node_id for r in replicas).values()) == {2}
    assert ray.available_resources().get("GPU", 0) == 16 - 2
    serve.delete("half")


def test_placement_group_backends_on_two_nodes_router_alternates(sim):
    assert deploy_script("ray-placement-group.py", *gpu_args("pg")) == 0
    backends = [r for r in running("pg") if r.deployment.startswith("LLMBackend")]
    assert len(backends) == 2 and {r.node_id for r in backends} == gpu_nodes()
    answers = collections.Counter(describe("pg")["node"] for _ in range(10))
    assert sorted(answers.values()) == [5, 5] and set(answers) == gpu_nodes()
    # The node-picker placement group is released once the nodes are chosen.
    assert all(pg.state == "REMOVED" or not pg.name.startswith("pg-")
               for pg in cluster.list_placement_groups())
    serve.delete("pg")


def test_product_scales_out_to_the_other_node_and_back(sim):
    assert deploy_script("ray-product", *gpu_args(
        "product", "--target-ongoing-requests", "1", "--upscale-delay", "1",
        "--downscale-delay", "3")) == 0
    assert len(running("product")) == 1
    with background_load(lambda: describe("product", delay_s=1.0), workers=6):
        replicas = wait_for_replicas(lambda: running("product"), 2, timeout=90)
    assert {r.node_id for r in replicas} == gpu_nodes()
    wait_until(lambda: len(cluster.list_replicas("product")) == 1, timeout=120,
               what="scale back to one replica")
    serve.delete("product")


def ranks_answering(app: str, concurrent: int = 32) -> tuple[dict, list]:
    """(gang id, rank) -> that rank's answer, and the failed requests' statuses and bodies, from
    concurrent requests that each hold their replica a second (HAProxy's least connections
    then spreads them over every rank)."""
    def post(_) -> tuple[int | None, str, dict | None]:
        try:
            r = requests.post(f"{URL}/{app}/", json={"delay_s": 1.0}, timeout=60)
        except requests.RequestException as exc:
            return None, repr(exc)[:300], None
        return r.status_code, r.text[:300], r.json() if r.status_code == 200 else None

    with concurrent_futures.ThreadPoolExecutor(concurrent) as pool:
        results = list(pool.map(post, range(concurrent)))
    answers = [answer for _, _, answer in results if answer is not None]
    failures = [(status, text) for status, text, answer in results if answer is None]
    return {(a["gang"]["id"], a["gang"]["rank"]): a for a in answers}, failures


def by_gang(answers: dict) -> dict[str, list]:
    gangs = collections.defaultdict(list)
    for (gang, _), answer in sorted(answers.items()):
        gangs[gang].append(answer)
    return gangs


def test_force_multi_wide_ep_gangs_each_on_one_node_a_dead_rank_restarts_its_gang_only(sim):
    assert deploy_script("ray-force-multi.py", *gpu_args(
        "wide", "--data-parallel-size", "8", "--enable-expert-parallel",
        "--num-replicas", "2")) == 0
    assert len(running("wide")) == 16 and ray.available_resources().get("GPU", 0) == 0
    answers, failures = wait_until(lambda: (lambda r: r if len(r[0]) == 16 else None)(
        ranks_answering("wide")), timeout=60, what="every rank answering")
    assert failures == []
    gangs = by_gang(answers)
    assert len(gangs) == 2
    for members in gangs.values():
        assert [a["gang"]["rank"] for a in members] == list(range(8))
        assert len({a["node"] for a in members}) == 1        # a gang packs onto one node
        # every rank of a gang got rank 0's group address (through the GCS)
        assert len({(a["gang"]["address"], a["gang"]["port"]) for a in members}) == 1
    assert {members[0]["node"] for members in gangs.values()} == gpu_nodes()
    # check_cluster.py's placement table names each replica's gang and rank, as the ranks say.
    said = {a["pid"]: {**a["gang"], "size": 8} for m in gangs.values() for a in m}
    listed = running("wide")
    assert {r.pid: {k: r.gang[k] for k in ("id", "rank", "size")} for r in listed} == {
        pid: {k: g[k] for k in ("id", "rank", "size")} for pid, g in said.items()}
    table = format_placement(listed)
    assert "GANG (RANK/SIZE)" in table and all(f"{g} {rank}/8" in table
                                               for g in gangs for rank in range(8))

    # One rank dies: Serve restarts its whole gang (a vLLM data-parallel group cannot lose a
    # rank) while the other gang keeps its replicas and answers all along.
    victim, kept = sorted(gangs)
    os.kill(gangs[victim][3]["pid"], signal.SIGKILL)
    deadline, failed = time.monotonic() + 180, []
    while True:
        answers, failures = ranks_answering("wide")
        failed += failures
        assert len(by_gang(answers)[kept]) > 0   # the kept gang answers in every round
        if len(answers) == 16 and victim not in by_gang(answers):
            break
        assert time.monotonic() < deadline, "the dead rank's gang did not restart in 180 s"
    after = by_gang(answers)
    print(f"requests failed while the gang restarted: {len(failed)}", failed[:3])
    assert failures == [] and kept in after and len(after) == 2
    assert [a["pid"] for a in after[kept]] == [a["pid"] for a in gangs[kept]]
    assert not {a["pid"] for a in gangs[victim]} & {a["pid"] for m in after.values() for a in m}
    serve.delete("wide")


def test_force_multi_wide_ep_ranks_of_tp2_keep_their_gpus_on_one_node_16_gpus_not_more(sim):
    """DP 8 x TP 2 (the wide-EP layout that fits R1 on 80 GB GPUs): one gang of 8 ranks over
    both nodes, each rank's two tensor-parallel workers on one node in bundles of the gang's
    group, no GPU taken twice, 16 GPUs in all."""
    assert deploy_script("ray-force-multi.py", *gpu_args(
        "wide2", "--data-parallel-size", "8", "--tensor-parallel-size", "2",
        "--enable-expert-parallel")) == 0
    assert len(running("wide2")) == 8 and ray.available_resources().get("GPU", 0) == 0
    answers, failures = wait_until(lambda: (lambda r: r if len(r[0]) == 8 else None)(
        ranks_answering("wide2", concurrent=16)), timeout=60, what="every rank answering")
    assert failures == []
    [members] = by_gang(answers).values()
    assert [a["gang"]["rank"] for a in members] == list(range(8))
    taken = set()
    for a in members:
        assert len(a["worker_nodes"]) == 2 and len(set(a["worker_nodes"])) == 1
        taken |= {(node, gpu) for node, gpus in zip(a["worker_nodes"], a["worker_gpus"])
                  for gpu in gpus}
    assert len(taken) == 16                                   # every GPU once
    assert {a["worker_nodes"][0] for a in members} == gpu_nodes()
    # rank 0's workers sit on rank 0's node, where the group's rendezvous is
    assert members[0]["worker_nodes"][0] == members[0]["gang"]["first_node"]
    assert sorted(i for a in members for i in a["bundles"]) == list(range(16))
    serve.delete("wide2")


R1_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "deepseek-r1")
LLAMA70B_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "llama-3.3-70b-instruct")


def test_single_gpu_refuses_r1_on_80gb_gpus_before_deploying(sim, capsys):
    code = deploy_script("ray-single-gpu.py", *gpu_args("r1single"), "--model", R1_CONFIG,
                         "--gpu-memory-gib", "80")
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "--tensor-parallel-size 1 --pipeline-parallel-size 1 cannot serve" in err
    assert "A layout that fits: --tensor-parallel-size 8 --pipeline-parallel-size 2" in err
    print(err)  # the refusal, for the record
    assert "r1single" not in serve.status().applications


def test_single_gpu_refuses_the_default_hub_model_on_80gb_gpus_before_deploying(
        sim, capsys, monkeypatch, tmp_path):
    """`python ray-single-gpu.py` as the README shows it: the default Hugging Face ID is read
    from the Hub (a stand-in on loopback) and planned like a local folder."""
    import huggingface_hub.constants

    from _stand_in_hub import r1_repository, stand_in_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    argv = [a for a in gpu_args("r1hub") if a not in ("--model", "unused-by-probe")]
    with stand_in_hub({"deepseek-ai/DeepSeek-R1": r1_repository()}) as (url, asked):
        monkeypatch.setenv("HF_ENDPOINT", url)
        code = deploy_script("ray-single-gpu.py", *argv, "--gpu-memory-gib", "80")
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert any(path.endswith("/model.safetensors.index.json") for path in asked)
    assert "will download 163 of 163 weight files of deepseek-ai/DeepSeek-R1" in err
    assert "--tensor-parallel-size 1 --pipeline-parallel-size 1 cannot serve" in err
    assert "A layout that fits: --tensor-parallel-size 8 --pipeline-parallel-size 2" in err
    assert "r1hub" not in serve.status().applications


def test_force_multi_auto_tensor_parallel_from_the_checkpoint(sim, capsys):
    code = deploy_script("ray-force-multi.py", *gpu_args("auto70b"), "--model", LLAMA70B_CONFIG,
                         "--tensor-parallel-size", "auto", "--gpu-memory-gib", "64",
                         "--max-model-len", "8192")
    out = capsys.readouterr().out
    assert code == 0
    assert "layout: --tensor-parallel-size 4 --pipeline-parallel-size 1 (auto)" in out
    assert "the cluster holds 4 such replica(s)" in out
    info = describe("auto70b")
    assert len(info["worker_nodes"]) == 4 and info["own_gpus"] == []
    serve.delete("auto70b")
