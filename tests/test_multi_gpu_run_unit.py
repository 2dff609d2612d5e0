"""Unit tests of the multi-GPU run's plan and figures: the steps for G GPUs, the CPU rehearsal's, ratios, vLLM's log lines."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import multi_gpu_run as run

ALL = list(run.PHASES)


def test_eight_gpus_cover_every_topology_and_reserve_all_eight_never_more():
    steps = run.plan(8, "cuda", ALL, "model-r1")
    names = [s.name for s in steps]
    assert names == [
        "force-multi 1 x TP 8", "vllm serve TP 8", "force-multi 2 x TP 4",
        "force-multi 2 x TP 4, one per node", "force-multi 1 x TP 4 x PP 2 over both nodes",
        "force-multi auto x auto", "placement-group, backends TP 4",
        "product scaling 1 -> 2 under load", "a replica killed and back",
        "MoE force-multi 1 x TP 8", "MoE force-multi DP 8 x EP"]
    by_name = {s.name: s for s in steps}
    # Every deployment holds the host's 8 GPUs (not 16: a TP group's GPUs are counted once).
    assert {s.gpus_reserved for s in steps if s.script != "vllm serve"} == {8, None}
    assert by_name["force-multi 1 x TP 4 x PP 2 over both nodes"].flags[-2:] == [
        "--pipeline-parallel-size", "2"]
    assert by_name["force-multi 2 x TP 4, one per node"].answering_nodes == 2
    ep = by_name["MoE force-multi DP 8 x EP"]
    assert ep.flags == ["--data-parallel-size", "8", "--enable-expert-parallel"]
    assert ep.compare_with == "MoE force-multi 1 x TP 8"
    assert by_name["vllm serve TP 8"].compare_with == "force-multi 1 x TP 8"
    assert {s.phase for s in steps} == set(ALL)


def test_two_gpus_put_two_one_gpu_replicas_on_one_node_with_single_gpu():
    steps = {s.name: s for s in run.plan(2, "cuda", ["one-node"], None)}
    assert steps["single-gpu 2 x 1 GPU"].script == "ray-single-gpu.py"
    assert "force-multi 2 x TP 1" not in steps


def test_the_cpu_rehearsal_runs_every_script_with_sizes_of_one_and_no_wide_ep():
    steps = run.plan(2, "cpu", ALL, None)
    assert {s.script for s in steps} == {"ray-force-multi.py", "vllm serve", "ray-single-gpu.py",
                                         "ray-placement-group.py", "ray-product"}
    assert all(s.gpus_reserved is None for s in steps)
    assert all("--pipeline-parallel-size" not in s.flags and "--data-parallel-size" not in s.flags
               for s in steps)
    assert all(s.flags[s.flags.index("--tensor-parallel-size") + 1] == "1"
               for s in steps if "--tensor-parallel-size" in s.flags)
    assert [s.action for s in steps][-2:] == ["scale-out", "kill-replica"]


def test_one_gpu_has_no_two_node_or_wide_ep_steps():
    assert [s.phase for s in run.plan(1, "cuda", ALL, "m")] == ["one-node", "one-node"]


def test_ratios_are_this_step_over_the_baseline():
    mine = {"output_token_throughput": 900.0, "ttft": {"p50": 0.05}, "latency": {"p50": 2.0}}
    base = {"output_token_throughput": 1000.0, "ttft": {"p50": 0.04}, "latency": None}
    assert run.ratios(mine, base) == {"output_tok_s": 0.9, "ttft_p50": 1.25,
                                      "latency_p50": None}


def test_engine_lines_keep_vllms_memory_figures_once_each():
    log = "\n".join([
        "(ServeReplica pid=1) INFO 12-05 [gpu_worker.py:1] Model loading took 58.97 GiB",
        "(ServeReplica pid=1) INFO 12-05 [gpu_worker.py:1] Model loading took 58.97 GiB",
        "INFO 12-05 [kv_cache_utils.py:2] GPU KV cache size: 6,041,984 tokens",
        "INFO something else"])
    assert run.engine_lines(log) == ["Model loading took 58.97 GiB",
                                     "GPU KV cache size: 6,041,984 tokens"]


def test_without_drops_a_flag_and_its_value():
    assert run.without(["--model", "m", "--device", "cpu", "-x"], "--device") == [
        "--model", "m", "-x"]
    assert run.without(["-x"], "--device") == ["-x"]


def test_the_summary_names_failures_and_ratios():
    ok = run.StepResult("a", "python a", ok=True, deploy_s=3.0, gpus_reserved=8,
                        nodes_answering=1, load={"successes": 4, "failures": 0,
                                                 "output_token_throughput": 10.0,
                                                 "ttft": {"p50": 0.02}},
                        extra={"ratio_to": "b", "ratios": {"output_tok_s": 1.1,
                                                           "ttft_p50": 0.9}})
    bad = run.StepResult("c", "python c", problems=["deploy exited 5"], deploy_output="why")
    text = run.markdown({"gpus": 8, "device": "cuda", "model": "m", "moe_model": None,
                         "concurrency": 1, "requests": 4, "max_tokens": 8}, [ok, bad])
    assert "| a | OK | 3.0 | 8 | 1 | 4/0 | 10.0 | 20.0 | b: tok/s x1.1, TTFT x0.9 |" in text
    assert "FAILED: deploy exited 5" in text and "why" in text


def test_free_ports_are_outside_the_kernels_ephemeral_range():
    """A server's port comes from below the range where connections take their source ports,
    and above Ray's worker ports: no other process can take it between the pick and the bind."""
    import socket

    import local_cluster

    ports = {local_cluster.free_port() for _ in range(20)}
    assert all(20000 <= port < 30000 for port in ports) and len(ports) > 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))
