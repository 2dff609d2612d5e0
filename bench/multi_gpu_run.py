"""The guide's topologies on one host of G GPUs, run as an operator runs them: one raylet with all G GPUs, two `ray start` raylets of G/2 each, then wide EP against tensor parallel."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# bench/ is the script's folder
from local_cluster import (LocalCluster, cpu_serve_settings, free_port,  # noqa: E402
                           vllm_serve_head)

EPILOG = """phases (each on a fresh local cluster, token auth on, everything on 127.0.0.1):
  one-node   one raylet with all G GPUs: ray-force-multi.py 1 replica x TP G (G GPUs reserved,
             not 2G), 2 replicas x TP G/2, then `vllm serve --tensor-parallel-size G` on the same
             GPUs under the same load (throughput and TTFT ratio to the 1 x TP G step)
  two-nodes  two raylets of G/2 GPUs each (CUDA_VISIBLE_DEVICES split, as two nodes; the head
             hosts replicas): ray-force-multi.py one replica per node; one replica over both
             with --pipeline-parallel-size 2 (a stage per node); ray-placement-group.py;
             ray-product scaling 1 -> 2 under load; --tensor-parallel-size auto
             --pipeline-parallel-size auto with the planner's figures beside vLLM's own log
             lines; a replica killed and back; stop_service.py
  wide-ep    one raylet with all G GPUs, the MoE model: --data-parallel-size G
             --enable-expert-parallel against --tensor-parallel-size G, throughput and TTFT
             side by side
Every step records its placement table, check_cluster.py --json, the load test's summary and
the deploy's output under --out (results.json, summary.md). With --device cpu the same run
rehearses on this machine's CPUs (logical GPUs, the demo model, tensor and pipeline sizes 1, no
wide EP: vLLM's CPU engine cannot run data-parallel MoE), so a GPU run finds no script bug.

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/multi_gpu_run.py --gpus 8 --out /tmp/multi_gpu
"""

PHASES = ("one-node", "two-nodes", "wide-ep")
PY = sys.executable


# ---------------------------------------------------------------------------------------------
# The plan: pure


@dataclass
class Step:
    phase: str
    name: str
    script: str                   # a deployment script, or "vllm serve"
    flags: list[str]
    app: str
    answering_nodes: int          # nodes whose replicas answer the load
    gpus_reserved: int | None     # GPUs the app holds (None: not checked, as with --device cpu)
    action: str = "load"          # load | scale-out | kill-replica | stop
    compare_with: str | None = None   # another step's name: ratios against it


@dataclass
class StepResult:
    name: str
    command: str
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    deploy_exit: int | None = None
    deploy_s: float | None = None
    deploy_output: str = ""
    placement: list[dict] = field(default_factory=list)
    gpus_reserved: float | None = None
    load: dict[str, Any] = field(default_factory=dict)
    nodes_answering: int | None = None
    engine_lines: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def plan(gpus: int, device: str, phases: list[str], moe_model: str | None) -> list[Step]:
    """The steps for a host of `gpus` GPUs. On CPU every tensor and pipeline size is 1 (the
    CPU engine runs one process per replica here) and GPUs are not counted."""
    half = max(gpus // 2, 1)
    cpu = device == "cpu"

    def tp(size: int) -> list[str]:
        return ["--tensor-parallel-size", "1" if cpu else str(size)]

    def gpus_for(count: int) -> int | None:
        return None if cpu else count

    # The sizes as they run (the step names say what ran).
    whole, part = (1, 1) if cpu else (gpus, half)

    steps: list[Step] = []
    if "one-node" in phases:
        steps += [
            Step("one-node", f"force-multi 1 x TP {whole}", "ray-force-multi.py",
                 ["--num-replicas", "1", *tp(gpus)], "tp", 1, gpus_for(gpus)),
            Step("one-node", f"vllm serve TP {whole}", "vllm serve", tp(gpus), "vllm", 1, None,
                 compare_with=f"force-multi 1 x TP {whole}"),
        ]
        if gpus >= 2 and half > 1 and not cpu:
            steps.append(Step("one-node", f"force-multi 2 x TP {part}", "ray-force-multi.py",
                              ["--num-replicas", "2", *tp(half)], "tp2", 1, gpus_for(gpus)))
        elif gpus >= 2:
            # ray-force-multi.py keeps one-GPU replicas a node apart: two on one node are
            # ray-single-gpu.py's.
            steps.append(Step("one-node", "single-gpu 2 x 1 GPU", "ray-single-gpu.py",
                              ["--num-replicas", "2"], "single", 1, gpus_for(2)))
    if "two-nodes" in phases and gpus >= 2:
        steps.append(Step("two-nodes", f"force-multi 2 x TP {part}, one per node",
                          "ray-force-multi.py", ["--num-replicas", "2", *tp(half)], "force", 2,
                          gpus_for(gpus)))
        if not cpu:  # on CPU both are one replica of one process: the first step again
            steps += [
                Step("two-nodes", f"force-multi 1 x TP {part} x PP 2 over both nodes",
                     "ray-force-multi.py", ["--num-replicas", "1", *tp(half),
                                            "--pipeline-parallel-size", "2"], "pp", 1, gpus),
                Step("two-nodes", "force-multi auto x auto", "ray-force-multi.py",
                     ["--tensor-parallel-size", "auto", "--pipeline-parallel-size", "auto"],
                     "auto", 0, None),
            ]
        steps += [
            Step("two-nodes", f"placement-group, backends TP {part}", "ray-placement-group.py",
                 tp(half), "pg", 2, gpus_for(gpus)),
            Step("two-nodes", "product scaling 1 -> 2 under load", "ray-product",
                 ["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
                  "--upscale-delay", "2", "--downscale-delay", "120", *tp(half)], "product", 2,
                 gpus_for(gpus), action="scale-out"),
            Step("two-nodes", "a replica killed and back", "ray-force-multi.py",
                 ["--num-replicas", "2", *tp(half)], "kill", 2, gpus_for(gpus),
                 action="kill-replica"),
        ]
    if "wide-ep" in phases and not cpu and moe_model and gpus >= 2:
        tp_name = f"MoE force-multi 1 x TP {gpus}"
        steps += [
            Step("wide-ep", tp_name, "ray-force-multi.py", ["--num-replicas", "1", *tp(gpus)],
                 "moe-tp", 1, gpus),
            Step("wide-ep", f"MoE force-multi DP {gpus} x EP", "ray-force-multi.py",
                 ["--data-parallel-size", str(gpus), "--enable-expert-parallel"], "moe-ep", 1,
                 gpus, compare_with=tp_name),
        ]
    return steps


def ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """This step's load figures over the baseline step's (output tok/s, TTFT p50, E2E p50)."""
    def ratio(key: str, stat: str | None = None) -> float | None:
        def get(load: dict) -> float | None:
            value = load.get(key)
            return value.get(stat) if stat and isinstance(value, dict) else value
        mine, theirs = get(result), get(baseline)
        return round(mine / theirs, 3) if mine and theirs else None

    return {"output_tok_s": ratio("output_token_throughput"),
            "ttft_p50": ratio("ttft", "p50"), "latency_p50": ratio("latency", "p50")}


ENGINE_LINE_MARKS = ("Model loading took", "Available KV cache memory", "GPU KV cache size",
                     "Maximum concurrency", "CUDA graph", "Memory profiling takes")


def engine_lines(text: str) -> list[str]:
    """vLLM's own memory figures from its log, one line each, de-duplicated in order."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        if any(mark in line for mark in ENGINE_LINE_MARKS):
            seen.setdefault(line.split("] ", 1)[-1].strip()[:300], None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# Running it: effects


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: list[StepResult] = []

    # -- the cluster
    def cluster(self, two_nodes: bool) -> LocalCluster:
        base = Path(tempfile.mkdtemp(prefix="multi-gpu-", dir="/tmp"))
        gpus, half = self.args.gpus, max(self.args.gpus // 2, 1)
        if two_nodes:
            split = (None, None) if self.args.device == "cpu" else (
                ",".join(map(str, range(half))), ",".join(map(str, range(half, 2 * half))))
            c = LocalCluster(base, self.args.cpus_per_node, gpus=(half, half), cuda_devices=split,
                             inherit_env=self.args.device == "cuda")
        else:
            c = LocalCluster(base, self.args.cpus_per_node, gpus=(gpus, 0),
                             inherit_env=self.args.device == "cuda")
        c.start(nodes=2 if two_nodes else 1)
        return c

    def engine_flags(self, step: Step) -> list[str]:
        model = self.args.moe_model if step.phase == "wide-ep" else self.args.model
        if self.args.device == "cpu":
            return ["--device", "cpu", "--model", model, "--max-model-len", "512"]
        return ["--model", model, "--load-format", self.args.load_format,
                "--max-model-len", str(self.args.max_model_len), *self.args.engine_args.split()]

    def deploy_flags(self, c: LocalCluster, step: Step) -> list[str]:
        return ["--address", c.address, "--host", "127.0.0.1", "--port", str(c.http_port),
                "--app-name", step.app, "--route-prefix", "/", "--timeout",
                str(self.args.deploy_timeout), *self.engine_flags(step), *step.flags]

    # -- one step
    def step(self, c: LocalCluster, step: Step) -> StepResult:
        say(f"== {step.name}")
        if step.script == "vllm serve":
            return self.vllm_serve(c, step)
        argv = self.deploy_flags(c, step)
        result = StepResult(step.name, f"python {step.script} " + " ".join(argv))
        started = time.monotonic()
        proc = c.run(PY, step.script, *argv, timeout=self.args.deploy_timeout + 120, check=False)
        result.deploy_exit, result.deploy_s = proc.returncode, round(time.monotonic() - started, 1)
        result.deploy_output = (proc.stdout + proc.stderr)[-6000:]
        if proc.returncode != 0:
            result.problems.append(f"deploy exited {proc.returncode}")
            return result
        try:
            if step.action == "scale-out":
                self.scale_out(c, step, result)
            self.record_cluster(c, step, result)
            if step.action == "kill-replica":
                self.kill_and_back(c, step, result)
            result.load = self.load(c.url, result, expected=step.answering_nodes or None)
            self.check(step, result)
            result.engine_lines = engine_lines(session_logs(c))
        finally:
            stop = c.script("stop_service.py", "--app", step.app, "--timeout", "120",
                            timeout=300, check=False)
            if stop.returncode != 0:
                result.problems.append(f"stop_service.py exited {stop.returncode}")
        result.ok = not result.problems
        return result

    def record_cluster(self, c: LocalCluster, step: Step, result: StepResult) -> None:
        report = c.report(step.app)
        result.placement = [{k: r.get(k) for k in ("deployment", "replica_id", "state",
                                                   "node_id", "resources", "bundle_nodes",
                                                   "gang")}
                            for r in report.get("replicas", [])]
        result.gpus_reserved = sum((n.get("gpus_total") or 0) - (n.get("gpus_available") or 0)
                                   for n in report.get("nodes", []))
        result.extra["check_cluster_healthy"] = report.get("healthy")

    def check(self, step: Step, result: StepResult) -> None:
        load = result.load
        if load.get("failures") or not load.get("successes"):
            result.problems.append(f"load: {load.get('successes')} answered, "
                                   f"{load.get('failures')} failed {load.get('error_kinds')}")
        if step.answering_nodes and result.nodes_answering != step.answering_nodes:
            result.problems.append(f"{result.nodes_answering} node(s) answered, expected "
                                   f"{step.answering_nodes}")
        if step.gpus_reserved is not None and result.gpus_reserved != step.gpus_reserved:
            result.problems.append(f"{result.gpus_reserved} GPUs reserved, expected "
                                   f"{step.gpus_reserved}")

    def load(self, url: str, result: StepResult, expected: int | None = None,
             endpoint: str = "/", model: str | None = None) -> dict[str, Any]:
        out = self.out / f"load-{len(self.results)}-{time.monotonic_ns()}.json"
        argv = ["load_test.py", "--url", url, "-c", str(self.args.concurrency),
                "-n", str(self.args.requests), "--max-tokens", str(self.args.max_tokens),
                "--ignore-eos", "--stream", "--no-progress", "--json", str(out),
                "--endpoint", endpoint, *(["--model", model] if model else []),
                *(["--expected-nodes", str(expected)] if expected else [])]
        proc = subprocess.run([PY, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=1800)
        if not out.exists():
            result.problems.append(f"load_test.py exited {proc.returncode}: {proc.stderr[-500:]}")
            return {}
        data = json.loads(out.read_text())
        summary = data["summary"]
        result.nodes_answering = len(data.get("nodes") or [])
        keep = ("successes", "failures", "error_kinds", "duration", "request_throughput",
                "output_token_throughput", "latency", "ttft", "itl", "node_counts", "balance")
        return {k: summary.get(k) for k in keep}

    def scale_out(self, c: LocalCluster, step: Step, result: StepResult) -> None:
        """Load until the second replica runs (ray-product starts with one)."""
        # At least 3 requests in flight per replica over a target of 2, long enough to stay
        # in flight: more than one replica can hold.
        background = subprocess.Popen(
            [PY, "load_test.py", "--url", c.url, "-c", str(max(self.args.concurrency, 6)),
             "-n", "0", "--duration", str(self.args.scale_timeout), "--max-tokens",
             str(max(self.args.max_tokens, 64)), "--ignore-eos", "--no-progress"],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        try:
            while time.monotonic() - started < self.args.scale_timeout:
                running = [r for r in c.report(step.app).get("replicas", [])
                           if r.get("state") == "RUNNING"]
                if len(running) >= 2:
                    result.extra["scaled_out_after_s"] = round(time.monotonic() - started, 1)
                    break
                time.sleep(3)
            else:
                result.problems.append(f"no second replica after {self.args.scale_timeout} s")
        finally:
            background.terminate()
            background.wait(timeout=60)
        if not result.problems:
            # Serve lists the new replica before the ingress routes to it: the measured load
            # starts once both nodes answer.
            self.wait_nodes_answering(c.url, 2, result)

    def wait_nodes_answering(self, url: str, count: int, result: StepResult) -> None:
        import requests

        seen: set[str] = set()
        started = time.monotonic()
        while time.monotonic() - started < 120:
            try:
                answer = requests.post(f"{url}/", json={"prompt": "hi", "max_tokens": 1},
                                       timeout=60)
                if answer.status_code == 200:
                    seen.add(answer.json().get("node"))
            except requests.RequestException:
                pass
            if len(seen) >= count:
                return
        result.problems.append(f"{len(seen)} node(s) answered in 120 s, expected {count}")

    def kill_and_back(self, c: LocalCluster, step: Step, result: StepResult) -> None:
        """SIGKILL one replica process; seconds until the app has all its replicas again."""
        import psutil

        victims = [r for r in c.report(step.app).get("replicas", []) if r.get("pid")]
        if not victims:
            result.problems.append("no replica process to kill")
            return
        victim = victims[-1]
        psutil.Process(victim["pid"]).kill()
        started = time.monotonic()
        while time.monotonic() - started < self.args.deploy_timeout:
            time.sleep(3)
            replicas = c.report(step.app).get("replicas", [])
            ids = {r["replica_id"] for r in replicas if r.get("state") == "RUNNING"}
            if len(ids) == len(victims) and victim["replica_id"] not in ids:
                result.extra["replica_back_after_s"] = round(time.monotonic() - started, 1)
                result.extra["killed"] = victim["replica_id"]
                self.wait_nodes_answering(c.url, step.answering_nodes, result)
                return
        result.problems.append(f"the killed replica was not replaced in "
                               f"{self.args.deploy_timeout} s")

    def vllm_serve(self, c: LocalCluster, step: Step) -> StepResult:
        """`vllm serve` on the same GPUs (no Ray application holds them now), same load."""
        from bench.serving_benchmark import stop_group, wait_http

        port = free_port()
        head = vllm_serve_head()
        flags = self.engine_flags(step)
        model = flags[flags.index("--model") + 1]
        # The model is vllm serve's argument; the device is the installed vLLM's own.
        flags = without(without(flags, "--model"), "--device")
        env = c.env()
        if self.args.device == "cpu":  # the settings the project's CPU replicas run with
            cpu_flags, cpu_env = cpu_serve_settings()
            flags += cpu_flags
            env.update(cpu_env)
        command = [*head, "serve", model, "--host", "127.0.0.1", "--port", str(port),
                   *flags, *step.flags]
        result = StepResult(step.name, " ".join(["vllm", *command[len(head):]]))
        log = self.out / "vllm-serve.log"
        started = time.monotonic()
        with open(log, "w") as logf:
            process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=logf,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/health", process, self.args.deploy_timeout)
                result.deploy_exit, result.deploy_s = 0, round(time.monotonic() - started, 1)
                result.load = self.load(f"http://127.0.0.1:{port}", result,
                                        endpoint="/v1/completions", model=model)
                self.check(step, result)
            except RuntimeError as exc:
                result.problems.append(f"{exc} (log: {log})")
            finally:
                stop_group(process)
        result.engine_lines = engine_lines(log.read_text(errors="replace"))
        result.ok = not result.problems
        return result

    # -- the whole run
    def run(self, steps: list[Step]) -> int:
        for phase in PHASES:
            mine = [s for s in steps if s.phase == phase]
            if not mine:
                continue
            c = self.cluster(two_nodes=phase == "two-nodes")
            try:
                for step in mine:
                    result = self.step(c, step)
                    if step.compare_with:
                        base = next((r for r in self.results if r.name == step.compare_with),
                                    None)
                        if base is not None and result.load and base.load:
                            result.extra["ratio_to"] = step.compare_with
                            result.extra["ratios"] = ratios(result.load, base.load)
                    self.results.append(result)
                    say(f"   {'OK' if result.ok else 'FAILED: ' + '; '.join(result.problems)}"
                        f" {summary_line(result)}")
                    self.save(steps)
            finally:
                c.stop()
                if not self.args.keep:
                    shutil.rmtree(c.base, ignore_errors=True)
        self.save(steps)
        print((self.out / "summary.md").read_text().split("\n## ", 1)[0], flush=True)
        failed = [r.name for r in self.results if not r.ok]
        say("FAILED STEPS: " + ", ".join(failed) if failed else "ALL STEPS OK")
        return 1 if failed or not self.results else 0

    def save(self, steps: list[Step]) -> None:
        meta = {"gpus": self.args.gpus, "device": self.args.device, "model": self.args.model,
                "moe_model": self.args.moe_model, "requests": self.args.requests,
                "concurrency": self.args.concurrency, "max_tokens": self.args.max_tokens,
                "planned": [s.name for s in steps]}
        (self.out / "results.json").write_text(json.dumps(
            {"run": meta, "steps": [asdict(r) for r in self.results]}, indent=2, default=str))
        (self.out / "summary.md").write_text(markdown(meta, self.results))


def without(flags: list[str], name: str) -> list[str]:
    """flags less `name` and its value."""
    if name not in flags:
        return flags
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


def summary_line(r: StepResult) -> str:
    load = r.load or {}
    ttft = (load.get("ttft") or {}).get("p50")
    return (f"deploy {r.deploy_s} s, GPUs reserved {r.gpus_reserved}, nodes answering "
            f"{r.nodes_answering}, {load.get('successes')} ok / {load.get('failures')} failed, "
            f"{_num(load.get('output_token_throughput'))} tok/s, TTFT p50 "
            f"{_num(ttft * 1000 if ttft else None)} ms"
            + "".join(f", {k} {v}" for k, v in r.extra.items()
                      if k in ("scaled_out_after_s", "replica_back_after_s")))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def markdown(meta: dict[str, Any], results: list[StepResult]) -> str:
    lines = [f"# Multi-GPU run: {meta['gpus']} GPUs ({meta['device']})", "",
             f"model `{meta['model']}`, MoE model `{meta['moe_model']}`; load: "
             f"-c {meta['concurrency']} -n {meta['requests']} --max-tokens {meta['max_tokens']} "
             "--ignore-eos --stream", "",
             "| step | result | deploy s | GPUs reserved | nodes answering | ok/failed | "
             "output tok/s | TTFT p50 ms | ratio to |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = r.load or {}
        ttft = (load.get("ttft") or {}).get("p50")
        rat = r.extra.get("ratios") or {}
        lines.append(
            f"| {r.name} | {'OK' if r.ok else 'FAILED: ' + '; '.join(r.problems)} | "
            f"{r.deploy_s} | {r.gpus_reserved} | {r.nodes_answering} | "
            f"{load.get('successes')}/{load.get('failures')} | "
            f"{_num(load.get('output_token_throughput'))} | "
            f"{_num(ttft * 1000 if ttft else None)} | "
            + (f"{r.extra['ratio_to']}: tok/s x{rat.get('output_tok_s')}, "
               f"TTFT x{rat.get('ttft_p50')}" if rat else "-") + " |")
    for r in results:
        lines += ["", f"## {r.name}", "", f"    {r.command}", ""]
        for key in ("scaled_out_after_s", "replica_back_after_s"):
            if key in r.extra:
                lines.append(f"- {key}: {r.extra[key]}")
        if r.placement:
            lines.append("- placement: " + "; ".join(
                f"{p['deployment']} {p['state']} on {str(p['node_id'])[:12]}"
                + (f" gang {p['gang']['id']} {p['gang']['rank']}" if p.get("gang") else "")
                for p in r.placement))
        lines += [f"- vLLM: {line}" for line in r.engine_lines[:12]]
        if r.problems:
            lines += ["", "```", r.deploy_output[-3000:], "```"]
    return "\n".join(lines) + "\n"


def session_logs(c: LocalCluster) -> str:
    """The text of every worker log of the cluster's sessions (vLLM's engines log there)."""
    texts = []
    for path in sorted(c.base.rglob("worker-*.err")) + sorted(c.base.rglob("worker-*.out")):
        texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=_Formatter)
    env = os.environ.get
    parser.add_argument("--device", choices=["cuda", "cpu"], default=env("MULTI_GPU_DEVICE", "cuda"),
                        help="cpu: rehearse on this machine's CPUs [env: MULTI_GPU_DEVICE]")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs of the host (default: nvidia-smi's count; 2 with --device cpu)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--only", default="",
                        help="comma-separated parts of step names: run just the steps that "
                             "contain one (e.g. 'TP 8,vllm serve')")
    parser.add_argument("--model", default=None,
                        help="the dense model (default: bench/model7b; the demo model on cpu)")
    parser.add_argument("--moe-model", default=str(REPO_ROOT / "bench" / "model-r1"),
                        help="the MoE model of the wide-ep phase (bench/make_model_r1.py writes it)")
    parser.add_argument("--load-format", default="dummy", help="vLLM --load-format on cuda")
    parser.add_argument("--max-model-len", type=int, default=4096, help="on cuda")
    parser.add_argument("--engine-args", default="",
                        help="more engine flags for every deploy and vllm serve (one string)")
    parser.add_argument("--requests", type=int, default=256, help="load_test.py -n per step")
    parser.add_argument("--concurrency", type=int, default=32, help="load_test.py -c")
    parser.add_argument("--max-tokens", type=int, default=128, help="load_test.py --max-tokens")
    parser.add_argument("--cpus-per-node", type=int, default=16,
                        help="CPUs each raylet declares")
    parser.add_argument("--deploy-timeout", type=int, default=900,
                        help="seconds a deploy (and a replica's comeback) may take")
    parser.add_argument("--scale-timeout", type=int, default=300,
                        help="seconds of load ray-product gets to start its second replica")
    parser.add_argument("--out", default=env("OUT", "/tmp/multi_gpu_out"),
                        help="folder for results.json, summary.md and the logs [env: OUT]")
    parser.add_argument("--keep", action="store_true",
                        help="keep each cluster's temp dir (Ray's logs) after the run")
    return parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        print(f"error: unknown phase(s) {', '.join(unknown)}; known: {', '.join(PHASES)}",
              file=sys.stderr)
        return 2
    if args.gpus is None:
        args.gpus = 2 if args.device == "cpu" else gpu_count()
    if args.gpus < 1:
        print("error: no GPU found (nvidia-smi -L); give --gpus or --device cpu", file=sys.stderr)
        return 2
    if args.model is None:
        if args.device == "cpu":
            from common.demo_model import ensure_demo_model

            args.model = str(ensure_demo_model(quiet=True))
        else:
            args.model = str(REPO_ROOT / "bench" / "model7b")
    if args.device == "cpu":
        args.moe_model = None
    elif "wide-ep" in phases and not Path(args.moe_model, "config.json").exists():
        print(f"error: no MoE model at {args.moe_model} (run bench/make_model_r1.py, or leave "
              "wide-ep out of --phases)", file=sys.stderr)
        return 2
    steps = plan(args.gpus, args.device, phases, args.moe_model)
    if args.only:
        parts = [p.strip() for p in args.only.split(",") if p.strip()]
        steps = [s for s in steps if any(p in s.name for p in parts)]
    if not steps:
        print("error: nothing to run (two-nodes needs --gpus >= 2; wide-ep needs --device "
              "cuda)", file=sys.stderr)
        return 2
    say(f"{len(steps)} step(s) on {args.gpus} GPU(s) ({args.device}): "
        + ", ".join(s.name for s in steps))
    return Run(args).run(steps)


if __name__ == "__main__":
    sys.exit(main())
