"""Real multi-GPU run of the deployments on one 2-GPU host: TP=2 on one node, then two 1-GPU raylets.

Phase A: one raylet with both GPUs; ray-force-multi.py --num-replicas 1 --tensor-parallel-size 2
(tensor parallel through the replica's own placement group: 2 GPUs reserved, not 4).
Phase B: a head without GPUs plus two raylets, each started with its own CUDA_VISIBLE_DEVICES and
one GPU: ray-placement-group.py (one backend per raylet), ray-product scaling 1 -> 2 under load,
ray-force-multi.py --num-replicas 2 --tensor-parallel-size 1 (one replica per raylet).
Each step records the placement table, check_cluster.py --json and a load_test.py summary under
--out (results.json + a Markdown summary). Everything binds to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")

LOCAL_IP = "127.0.0.1"
URL = f"http://{LOCAL_IP}:8000"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/multi_gpu_out"),
                        help="folder for results.json and summary.md")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: rehearse phase B on this machine with the demo model")
    parser.add_argument("--phases", default="A,B",
                        help="A (TP=2 on one node), B (two 1-GPU raylets)")
    parser.add_argument("--requests", type=int, default=512, help="load_test -n")
    parser.add_argument("--concurrency", type=int, default=64, help="load_test -c")
    parser.add_argument("--max-tokens", type=int, default=64, help="load_test --max-tokens")
    return parser.parse_args(argv)


class Recorder:
    def __init__(self, out: str):
        self.out = out
        self.steps: list[dict] = []
        os.makedirs(out, exist_ok=True)

    def save(self) -> None:
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.steps, f, indent=2, default=str)
        lines = []
        for step in self.steps:
            lines.append(f"## {step['name']}\n")
            lines.append(f"exit code: {step.get('deploy_exit')}  {step.get('note', '')}\n")
            if step.get("placement"):
                lines.append("```\n" + step["placement"] + "\n```\n")
            if step.get("resources"):
                lines.append(f"cluster GPUs: {step['resources']}\n")
            if step.get("load"):
                load = step["load"]
                lines.append(f"load_test: {load}\n")
            if step.get("error"):
                lines.append("```\n" + step["error"][-3000:] + "\n```\n")
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines))


def engine_flags(device: str, tp: int) -> list[str]:
    if device == "cpu":
        from common.demo_model import ensure_demo_model

        return ["--device", "cpu", "--model", str(ensure_demo_model(quiet=True)),
                "--tensor-parallel-size", "1", "--max-model-len", "1024"]
    return ["--model", os.path.join(ROOT, "bench", "model7b"), "--load-format", "dummy",
            "--enforce-eager", "--max-model-len", "2048", "--gpu-memory-utilization", "0.85",
            "--tensor-parallel-size", str(tp)]


def common_flags(app: str) -> list[str]:
    return ["--app-name", app, "--route-prefix", f"/{app}", "--host", LOCAL_IP, "--port", "8000",
            "--proxy-location", "HeadOnly", "--timeout", "420"]


def run_load(app: str, args, duration: float | None = None) -> dict:
    from loadgen import client as loadgen

    config = loadgen.LoadConfig(url=f"{URL}/{app}", concurrency=args.concurrency,
                                num_requests=args.requests, max_tokens=args.max_tokens,
                                ignore_eos=True, timeout=300)
    summary = loadgen.summarize(loadgen.run_load_sync(config))
    return {"successes": summary.successes, "failures": summary.failures,
            "errors": summary.error_kinds, "duration_s": round(summary.duration, 2),
            "output_tok_s": round(summary.output_token_throughput, 1),
            "req_s": round(summary.request_throughput, 2),
            "latency_p50_ms": round((summary.latency.p50 or 0) * 1000, 1),
            "latency_p99_ms": round((summary.latency.p99 or 0) * 1000, 1),
            "node_counts": summary.node_counts, "balance": summary.balance}


def check_cluster_json(app: str) -> dict:
    import check_cluster

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = check_cluster.main(["--json", "--app", app])
    text = buffer.getvalue()
    report, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    return {"exit_code": code, "replicas": report.get("replicas"), "pending": report.get("pending"),
            "warnings": report.get("warnings"),
            "nodes": [{k: n.get(k) for k in ("node_id", "gpus_total", "gpus_available", "gpu_model")}
                      for n in report.get("nodes", [])]}


def step(rec: Recorder, name: str, script: str, argv: list[str], app: str, args,
         during_load=None) -> None:
    import ray
    from ray import serve

    from common import cluster
    from common.cluster_format import format_placement
    from common.demo import load_script

    entry: dict = {"name": name, "command": f"python {script} " + " ".join(argv),
                   "started": time.strftime("%H:%M:%S")}
    rec.steps.append(entry)
    try:
        buffer = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(buffer):
            entry["deploy_exit"] = load_script(script).main(argv)
        entry["deploy_s"] = round(time.monotonic() - t0, 1)
        entry["deploy_output"] = buffer.getvalue()[-4000:]
        entry["placement"] = format_placement(cluster.list_replicas(app))
        entry["resources"] = {"GPU_total": ray.cluster_resources().get("GPU"),
                              "GPU_available": ray.available_resources().get("GPU", 0)}
        entry["check_cluster"] = check_cluster_json(app)
        if during_load is not None:
            during_load(entry)
        else:
            entry["load"] = run_load(app, args)
        entry["placement_after_load"] = format_placement(cluster.list_replicas(app))
    except Exception:  # noqa: BLE001 - the traceback is recorded in the step's entry; the next step runs
        entry["error"] = traceback.format_exc()
    finally:
        rec.save()
        print(f"== {name}: exit {entry.get('deploy_exit')} {entry.get('load', '')}", flush=True)
        print(entry.get("placement", ""), flush=True)
        with contextlib.suppress(Exception):
            serve.delete(app)


def phase_a(rec: Recorder, args) -> None:
    import ray
    from ray import serve
    from common.deploy import start_serve

    ray.init(num_gpus=2, num_cpus=8, _node_ip_address=LOCAL_IP, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    try:
        start_serve(LOCAL_IP, 8000, "HeadOnly")
        step(rec, "A: ray-force-multi.py, 1 replica x TP=2 on one 2-GPU node", "ray-force-multi.py",
             ["--num-replicas", "1", *engine_flags(args.device, 2), *common_flags("tp2")],
             "tp2", args)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def phase_b(rec: Recorder, args) -> None:
    import ray
    from ray import serve
    from common.deploy import start_serve
    from ray.cluster_utils import Cluster

    from common import cluster
    from common.cluster_format import format_placement

    cluster_ = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "node_ip_address": LOCAL_IP, "include_dashboard": False})
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for gpu in ("0", "1"):
            # Each raylet sees one physical GPU, as on two 1-GPU machines.
            if args.device == "cuda":
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            cluster_.add_node(num_cpus=4, num_gpus=1 if args.device == "cuda" else 0,
                              node_ip_address=LOCAL_IP,
                              resources=None if args.device == "cuda" else {"GPU_SIM": 1})
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    cluster_.wait_for_nodes()
    ray.init(address=cluster_.address, _node_ip_address=LOCAL_IP, logging_level="WARNING",
             log_to_driver=False)
    cpu_extra = ["--cpus-per-replica", "4"] if args.device == "cpu" else []
    try:
        start_serve(LOCAL_IP, 8000, "HeadOnly")
        step(rec, "B1: ray-placement-group.py across two 1-GPU raylets", "ray-placement-group.py",
             [*engine_flags(args.device, 1), *common_flags("pg"), *cpu_extra], "pg", args)

        def scale_out(entry: dict) -> None:
            # Load in back-to-back batches until the second replica runs, then one measured
            # batch that both replicas answer.
            stop = threading.Event()
            batches: list = []

            def keep_loading():
                while not stop.is_set():
                    batches.append(run_load("product", args))

            thread = threading.Thread(target=keep_loading)
            started = time.monotonic()
            thread.start()
            try:
                while time.monotonic() - started < 300:
                    running = [r for r in cluster.list_replicas("product") if r.state == "RUNNING"]
                    if len(running) == 2:
                        entry["scaled_out_after_s"] = round(time.monotonic() - started, 1)
                        entry["placement_scaled"] = format_placement(running)
                        break
                    time.sleep(2)
            finally:
                stop.set()
                thread.join(timeout=600)
            entry["load_while_scaling"] = batches
            entry["load"] = run_load("product", args)

        step(rec, "B2: ray-product scaling 1 -> 2 under load", "ray-product",
             ["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "8",
              "--upscale-delay", "2", "--downscale-delay", "60", "--max-ongoing-requests", "256",
              *engine_flags(args.device, 1), *common_flags("product"), *cpu_extra],
             "product", args, during_load=scale_out)
        step(rec, "B3: ray-force-multi.py, 2 replicas x TP=1, one per raylet", "ray-force-multi.py",
             ["--num-replicas", "2", *engine_flags(args.device, 1), *common_flags("force"),
              *cpu_extra], "force", args)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster_.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    rec = Recorder(args.out)
    phases = [p.strip().upper() for p in args.phases.split(",")]
    if "A" in phases and args.device == "cuda":
        phase_a(rec, args)
    if "B" in phases:
        phase_b(rec, args)
    rec.save()
    failed = [s["name"] for s in rec.steps if s.get("error") or s.get("deploy_exit") != 0]
    print("FAILED STEPS: " + ", ".join(failed) if failed else "ALL STEPS OK", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
