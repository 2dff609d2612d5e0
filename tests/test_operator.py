"""The README's operator flow with real processes: `ray start` head + `ray start --address` node
(8 logical GPUs each, token auth on), the scripts run from a copy of the repo in a clean
environment, the guide's curl, load_test.py on both nodes (also through the placement-group
router), a replica restarted after the copy is gone, check_cluster.py and stop_service.py, and
load_test.py --report's page for a node that answers nothing.

Every process gets its own HOME (the token) and RAY_TMPDIR (sessions, ray_current_cluster), so the
machine's ~/.ray and /tmp/ray stay untouched; Ray is ended by the processes of this test's own
temp dir, never by stopping every Ray on the machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from _browser import inspect_report
from _cluster_fixtures import started_with_retry
from _serve_fixtures import clean_env, demo_model, free_port, wait_until
from common.cli import EXIT_OK, EXIT_RAY_AUTH
from common.demo import end_processes_of_session

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
GUIDE_PROMPT = "请简要介绍人工智能的发展历史"
# What the repo copy leaves out: what an operator's checkout on the head would not ship either.
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", ".cache", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".hypothesis")


class Operator:
    """One operator's machine: a clean environment, a token in its HOME, a 2-node cluster."""

    def __init__(self, base: Path):
        self.base = base
        self.home = base / "home"
        self.home.mkdir()
        self.gcs_port = free_port()
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.copy = base / "checkout"
        shutil.copytree(ROOT, self.copy, ignore=COPY_IGNORE)
        self.model = demo_model()

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(self.home, self.base, **extra)

    def run(self, *cmd: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 900, check_code: int | None = EXIT_OK) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=env or self.env(), cwd=cwd or self.copy,
                              capture_output=True, text=True, timeout=timeout)
        print(f"$ {' '.join(cmd[1:] if cmd[0] == PY else cmd)}  -> exit {proc.returncode}")
        print(proc.stdout[-3000:])
        print(proc.stderr[-3000:], file=sys.stderr)
        if check_code is not None:
            assert proc.returncode == check_code, proc.stderr[-3000:]
        return proc

    def script(self, name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(PY, name, *args, **kwargs)

    def start_cluster(self) -> None:
        # Ray's workers start in the raylet's directory: not the checkout, which goes away later.
        home = {"cwd": self.home}
        self.run(RAY, "get-auth-token", "--generate", **home)
        (self.home / ".ray" / "auth_token").chmod(0o600)
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=8",
                  "--object-store-memory=300000000", "--disable-usage-stats"]
        # The head turns token auth on by itself (a token exists); node 2 must be told.
        self.run(RAY, "start", "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", *common, **home)
        self.run(RAY, "start", f"--address={self.address}",
                 f"--dashboard-agent-listen-port={free_port()}",
                 f"--metrics-export-port={free_port()}", *common,
                 env=self.env(RAY_AUTH_MODE="token"), **home)

    def stop_cluster(self) -> None:
        end_processes_of_session(str(self.base))

    def print_serve_logs(self, lines: int = 40) -> None:
        """The Serve controller's last words, for a failed wait."""
        for log in sorted((self.base / "ray" / "session_latest" / "logs" / "serve")
                          .glob("controller_*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:]))

    def report(self, *args: str, cwd: Path | None = None) -> dict:
        """check_cluster.py --json; Ray may interleave log lines, the report is the JSON object."""
        out = self.script("check_cluster.py", "--json", *args, check_code=None, cwd=cwd).stdout
        return json.JSONDecoder().raw_decode(out[out.index("{\n"):])[0]

    def deploy(self, script: str, app: str, *args: str, env: dict | None = None) -> None:
        self.script(script, "--device", "cpu", "--model", self.model, "--max-model-len", "512",
                    "--host", "127.0.0.1", "--port", str(self.http_port),
                    "--proxy-location", "HeadOnly", "--app-name", app, "--timeout", "600", *args,
                    env=env)

    def curl(self) -> dict:
        body = json.dumps({"prompt": GUIDE_PROMPT, "max_tokens": 8}, ensure_ascii=False)
        proc = self.run("curl", "-sS", "-X", "POST", f"{self.url}/", "-H",
                        "Content-Type: application/json", "-d", body)
        return json.loads(proc.stdout)

    def load_test(self, *extra: str, cwd: Path | None = None) -> dict:
        out = self.base / f"load-{time.monotonic_ns()}.json"
        self.script("load_test.py", "-c", "20", "-n", "100", "--max-tokens", "8", "--url",
                    self.url, "--no-progress", "--json", str(out), *extra, cwd=cwd)
        return json.loads(out.read_text())


@contextlib.contextmanager
def running_cluster(operator_class: type, prefix: str):
    """An operator of `operator_class` with its 2-node cluster started, ended by its PIDs."""
    op = started_with_retry(lambda: started_operator(operator_class, prefix), "the cluster",
                            retry_on=(AssertionError, subprocess.TimeoutExpired))
    try:
        yield op
    finally:
        op.stop_cluster()
        if not os.environ.get("KEEP_OPERATOR_DIR"):  # logs for a post-mortem
            shutil.rmtree(op.base, ignore_errors=True)


def started_operator(operator_class: type, prefix: str):
    """An operator whose `ray start` commands succeeded; if one failed (Ray gives a raylet a
    fixed 30 s to register, which a loaded test machine can exceed), what it started is ended."""
    op = operator_class(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))
    try:
        op.start_cluster()
    except BaseException:
        op.stop_cluster()
        shutil.rmtree(op.base, ignore_errors=True)
        raise
    return op


@pytest.fixture(scope="module")
def operator():
    with running_cluster(Operator, "op-") as op:
        yield op


def assert_both_nodes(op: Operator, result: dict, nodes: set[str]) -> None:
    counts = result["summary"]["node_counts"]
    print(f"node split: {counts}")
    assert set(counts) == nodes, counts
    # Least connections gives a replica that answers faster more of the requests: on a busy
    # 2-core machine one node's replica can be several times slower (88/12 seen). What this
    # guards against is a node answering (almost) nothing, as proxies that prefer their own
    # node's replica make it.
    assert all(count >= 0.1 * sum(counts.values()) for count in counts.values()), counts
    assert result["summary"]["failures"] == 0


def note_answering_node(op: Operator, seen: set[str]) -> None:
    """One POST / through --port; the node that answered it goes into `seen` (a failure or a
    refusal adds nothing: the callers wait for what they need)."""
    try:
        response = requests.post(f"{op.url}/", json={"prompt": "hi", "max_tokens": 2},
                                 timeout=60)
        if response.status_code == 200:
            seen.add(response.json()["node"])
    except requests.RequestException:
        pass


def cluster_nodes(report: dict) -> tuple[set[str], str]:
    nodes = {n["node_id"] for n in report["nodes"] if n["alive"]}
    head = next(n["node_id"] for n in report["nodes"] if n["is_head"])
    return nodes, head


def test_token_found_for_every_address_form(operator):
    op = operator
    for args, env in ((["--address", op.address], None), ([], op.env(RAY_ADDRESS=op.address)),
                      (["--address", "auto"], None)):
        proc = op.script("check_cluster.py", *args, env=env, check_code=None)
        assert proc.returncode in (EXIT_OK, 4), proc.stderr
        assert "with token auth" in proc.stderr and ".ray/auth_token" in proc.stderr
        assert "127.0.0.1" in proc.stdout


def test_auth_failure_is_its_own_exit_code(operator):
    op = operator
    empty_home = op.base / "no-token-home"
    empty_home.mkdir(exist_ok=True)
    missing = op.script("check_cluster.py", "--address", op.address,
                        env=op.env(HOME=str(empty_home)), check_code=EXIT_RAY_AUTH)
    assert "requires token authentication" in missing.stderr and "no token" in missing.stderr
    wrong = op.script("stop_service.py", "--address", op.address,
                      env=op.env(HOME=str(empty_home), RAY_AUTH_TOKEN="0" * 64),
                      check_code=EXIT_RAY_AUTH)
    assert "refused" in wrong.stderr and "Traceback" not in wrong.stderr


def test_force_multi_both_nodes_and_restart_without_the_checkout(operator):
    op = operator
    op.deploy("ray-force-multi.py", "force", "--address", op.address, "--num-replicas", "2",
              "--tensor-parallel-size", "1")
    report = op.report("--address", op.address)
    nodes, head = cluster_nodes(report)
    replicas = [r for r in report["replicas"] if r["app"] == "force"]
    assert {r["node_id"] for r in replicas} == nodes and len(nodes) == 2
    assert head in {r["node_id"] for r in replicas}, "the head hosts a replica"
    answer = op.curl()
    assert answer["object"] == "text_completion" and answer["node"] in nodes
    assert_both_nodes(op, op.load_test(), nodes)

    # The checkout goes away; a replica dies; Serve must bring it back from the uploaded code.
    shutil.rmtree(op.copy)
    victim = next(r for r in replicas if r["node_id"] != head)
    psutil.Process(victim["pid"]).kill()
    killed_at = time.monotonic()
    seen: set[str] = set()

    def answers_from_both() -> bool:
        note_answering_node(op, seen)
        return seen == nodes and len(running_replicas(op, "force")) == 2

    try:
        wait_until(answers_from_both, timeout=120, interval=1, what="both nodes answering again")
    except AssertionError:
        op.print_serve_logs()
        raise
    print(f"both nodes answered again {time.monotonic() - killed_at:.0f} s after the kill")
    after = running_replicas(op, "force")
    assert victim["replica_id"] not in {r["replica_id"] for r in after}
    assert_both_nodes(op, op.load_test(cwd=ROOT), nodes)
    op.script("stop_service.py", "--address", op.address, "--app", "force", cwd=ROOT)
    shutil.copytree(ROOT, op.copy, ignore=COPY_IGNORE)


def running_replicas(op: Operator, app: str) -> list[dict]:
    report = op.report("--address", op.address, "--app", app, cwd=ROOT)
    return [r for r in report["replicas"] if r["state"] == "RUNNING"]


def test_single_gpu_both_nodes_via_ray_address(operator):
    op = operator
    op.deploy("ray-single-gpu.py", "single", "--num-replicas", "2", "--replicas-per-node", "1",
              env=op.env(RAY_ADDRESS=op.address))
    nodes, _ = cluster_nodes(op.report("--address", op.address))
    assert op.curl()["node"] in nodes
    assert_both_nodes(op, op.load_test(), nodes)
    op.script("stop_service.py", "--address", op.address, "--app", "single")


def test_placement_group_router_over_both_nodes(operator):
    # Two backends pinned to the two raylets (one on the head), reached by two router replicas
    # over the backends' own HTTP servers; the guide's curl and load_test.py get both nodes.
    op = operator
    op.deploy("ray-placement-group.py", "pg", "--tensor-parallel-size", "1",
              "--num-backends", "2", "--router-replicas", "2")
    nodes, head = cluster_nodes(op.report())
    assert op.curl()["node"] in nodes
    result = op.load_test()
    assert_both_nodes(op, result, nodes)
    assert head in result["summary"]["node_counts"]
    op.script("stop_service.py", "--app", "pg")


def test_product_scales_out_to_the_second_node(operator):
    op = operator
    op.deploy("ray-product", "product", "--address", "auto", "--tensor-parallel-size", "1",
              "--target-ongoing-requests", "2", "--upscale-delay", "2",
              "--downscale-delay", "600")
    nodes, _ = cluster_nodes(op.report("--address", "auto"))
    # 6 in flight over a target of 2 asks for more replicas than the 2 nodes hold, and leaves
    # CPU to the second engine starting on the same machine.
    load = subprocess.Popen([PY, "load_test.py", "-c", "6", "-n", "0", "--duration", "300",
                             "--max-tokens", "64", "--url", op.url, "--no-progress"],
                            env=op.env(), cwd=op.copy, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(requests.get(f"{op.url}/nodes", timeout=30)
                               .json()["replica_nodes"]) == 2,
                   timeout=300, interval=3, what="scale-out to a second node")
    finally:
        load.terminate()
        load.wait(30)
    # Serve lists the new replica before every HAProxy routes to it and before its engine's
    # first answers come at speed: the split is measured once both nodes answer through --port.
    seen: set[str] = set()

    def answers_from_both() -> bool:
        note_answering_node(op, seen)
        return seen == nodes

    wait_until(answers_from_both, timeout=120, interval=0.5,
               what="both nodes answering through the ingress")
    assert_both_nodes(op, op.load_test(), nodes)
    op.script("stop_service.py", "--address", "auto", "--shutdown")


def test_report_shows_a_replica_node_that_answers_nothing(operator, tmp_path):
    """The README's "all requests answered by one node" case made on purpose: the Python proxy
    ingress with node-local routing turned back on (the operator's environment wins) sends every
    request to the head's replica. load_test.py --report shows the worker as a flagged zero bar."""
    op = operator
    op.script("stop_service.py", "--address", op.address, "--shutdown", check_code=None)
    op.deploy("ray-force-multi.py", "idle", "--address", op.address, "--num-replicas", "2",
              "--tensor-parallel-size", "1", "--ingress", "proxy",
              env=op.env(RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="1"))
    nodes, head = cluster_nodes(op.report("--address", op.address))
    (worker,) = nodes - {head}
    report = tmp_path / "report.html"
    result = op.load_test("--stream", "--report", str(report))
    # The proxy tries its own node's replica once per request, then any replica: when that one
    # is slow to say how busy it is (2 cores, streaming), a request can still reach the worker.
    counts = result["summary"]["node_counts"]
    assert set(counts) == {head, worker} and counts[worker] <= 5, counts
    op.script("stop_service.py", "--address", op.address, "--shutdown")

    screenshot = tmp_path / "report.png"
    seen = inspect_report(report, screenshot)
    print(f"report {report}, screenshot {screenshot}: {json.dumps(seen, indent=1)}")
    assert seen["errors"] == [], seen["errors"]
    assert seen["node_bars"] == 2                   # one bar per node, the idle one included
    if counts[worker] == 0:
        assert seen["bar_texts"] == ["100 (100.0%)", "0 — IDLE"]
        assert any(worker in warning and "answered nothing" in warning
                   for warning in seen["warnings"])
    else:
        assert seen["bar_texts"] == [f"{counts[head]} ({counts[head]:.1f}%)",
                                     f"{counts[worker]} ({counts[worker]:.1f}%)"]
