"""`make demo`'s own program, as a newcomer meets it: a stale Ray address file on the machine, a
token in HOME (so the head it starts turns token auth on), the service left running, every
command it prints run as printed, a second run reusing the service, and the printed stop command
ending what the demo started; load_test.py --report's page against the demo, opened in headless
Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import requests

from _browser import inspect_report
from _serve_fixtures import clean_env, free_port
from common.demo import end_processes_of_session

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def processes_under(path: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(path in part for part in (p.info["cmdline"] or []))]


def node_id_flags(pids: list[int]) -> set[str]:
    """The `--node-id=...` arguments of these processes (Ray's daemons name their node)."""
    flags = set()
    for pid in pids:
        try:
            flags |= {part for part in psutil.Process(pid).cmdline()
                      if part.startswith("--node-id=")}
        except psutil.Error:
            pass
    return flags


def processes_naming(flags: set[str]) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if flags & set(p.info["cmdline"] or [])]


@pytest.fixture
def machine():
    base = Path(tempfile.mkdtemp(prefix="demo-", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    # A head whose processes were killed leaves its address behind; nothing listens there now.
    (base / "ray").mkdir()
    (base / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = clean_env(home, base)
    subprocess.run([str(Path(PY).parent / "ray"), "get-auth-token", "--generate"], env=env,
                   capture_output=True, check=True)
    try:
        yield base, env
    finally:
        end_processes_of_session(str(base))
        shutil.rmtree(base, ignore_errors=True)


def run(cmd: list[str] | str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, shell=isinstance(cmd, str))
    print(f"$ {cmd if isinstance(cmd, str) else ' '.join(cmd)} -> exit {proc.returncode}")
    print(proc.stdout[-4000:])
    print(proc.stderr[-2000:], file=sys.stderr)
    return proc


def test_demo_stays_up_and_every_printed_command_works(machine, tmp_path):
    base, env = machine
    ray_port, http_port = free_port(), free_port()
    demo = [PY, "-m", "common.demo", "--ray-port", str(ray_port), "--port", str(http_port)]
    first = run(demo, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting a local Ray head" in first.stdout        # the stale address was not taken
    assert '"object": "text_completion"' in first.stdout and "HTTP 200" in first.stdout

    commands = [line.strip() for line in first.stdout.splitlines()
                if re.match(r"\s+(curl|\S*python) ", line)]
    stop = re.search(r"^stop the demo: (.+)$", first.stdout, re.M).group(1)
    assert len(commands) == 4, commands
    for command in commands:
        done = run(command, env)
        assert done.returncode == 0, done.stderr[-2000:]
        if command.startswith("curl") and "chat" in command:
            assert "Paris" in done.stdout, done.stdout       # a real model answers in words

    # The HTML report of a streamed run, against the demo; opened in a browser at the end.
    url = f"http://127.0.0.1:{http_port}"
    report = tmp_path / "report.html"
    reported = run([PY, "load_test.py", "-c", "4", "-n", "12", "--max-tokens", "8", "--stream",
                    "--url", url, "--no-progress", "--report", str(report)], env)
    assert reported.returncode == 0, reported.stderr[-2000:]
    replica_nodes = requests.get(f"{url}/nodes", timeout=30).json()["replica_nodes"]

    again = run(demo, env)
    assert again.returncode == 0 and "reusing it" in again.stdout
    assert "starting a local Ray head" not in again.stdout

    assert processes_under(str(base))
    head_node = node_id_flags(processes_under(str(base)))
    assert head_node
    stopped = run(stop, env)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped the demo's Ray head" in stopped.stdout
    assert not processes_under(str(base))
    # Ray's client server names only the node's ID, not the session directory.
    assert not processes_naming(head_node)

    page = report.read_text()
    assert "engine layout (per replica)" in page and "max model length" in page
    screenshot = tmp_path / "report.png"
    seen = inspect_report(report, screenshot)
    print(f"report {report}, screenshot {screenshot}: {seen}")
    assert seen["errors"] == [], seen["errors"]
    assert seen["drawn"] and seen["external"] == []
    assert {"latency-e2el", "latency-ttft", "latency-itl", "timeline", "per-node"} <= set(seen["plots"])
    assert seen["node_bars"] == len(replica_nodes) == 1     # one bar per node holding replicas
    assert seen["bar_texts"] == ["12 (100.0%)"]
