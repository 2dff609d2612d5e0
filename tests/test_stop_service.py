"""Tests stop_service.py: graceful stop with requests in flight, nothing running, unreachable Ray."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

from _cluster_fixtures import ROOT, subprocess_env

import requests
from ray import serve

import stop_service
from common.cli import EXIT_FAILURE, EXIT_OK, EXIT_RAY_UNREACHABLE
from replica import ray_compat
from replica.config import PROJECT_MARKER_ENV

SLEEP_S = 2.0


@serve.deployment(num_replicas=1, max_ongoing_requests=10, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=0.5)
class Slow:
    async def __call__(self, *args):
        await asyncio.sleep(SLEEP_S)
        return "finished"


SIMULATED_CLUSTER = {"gpu_nodes": 1}


def test_stop_waits_for_in_flight_requests(sim, capsys):
    handle = serve.run(Slow.bind(), name="slowapp", route_prefix="/slow")
    # Requests through the handle and through the HTTP proxy, both in flight when the stop begins.
    responses = [handle.remote() for _ in range(3)]
    http_results: list = []

    def http_call():
        try:
            r = requests.post("http://127.0.0.1:8000/slow", timeout=30)
            http_results.append((r.status_code, r.text))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            http_results.append(("error", repr(exc)))

    threads = [threading.Thread(target=http_call) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.7)  # long enough for every request to reach the replica, well under SLEEP_S

    start = time.monotonic()
    code = stop_service.main(["--address", sim[0].address, "--app", "slowapp", "--timeout", "30"])
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out

    assert code == EXIT_OK, out
    assert [r.result(timeout_s=30) for r in responses] == ["finished"] * 3
    for t in threads:
        t.join(timeout=30)
    assert http_results == [(200, "finished")] * 2
    assert "slowapp" not in serve.status().applications
    assert "Stopped slowapp" in out
    assert elapsed < 30


def test_nothing_running_exits_0(sim, capsys):
    assert stop_service.main(["--address", sim[0].address, "--timeout", "10"]) == EXIT_OK
    assert "nothing is running" in capsys.readouterr().out.lower()

    assert stop_service.main(["--address", sim[0].address, "--app", "no-such-app"]) == EXIT_OK
    out = capsys.readouterr().out.lower()
    assert "nothing is running" in out and "no-such-app" in out


def ours(name: str):
    """Slow, marked as the project's scripts mark their deployments."""
    return Slow.options(name=name, ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": dict(PROJECT_MARKER_ENV)}})


def test_default_stops_only_the_projects_apps_and_all_stops_the_rest(sim, capsys):
    serve.run(ours("A").bind(), name="first", route_prefix="/first")
    serve.run(ours("B").bind(), name="second", route_prefix="/second")
    serve.run(Slow.options(name="C").bind(), name="unrelated", route_prefix="/unrelated")
    code = stop_service.main(["--address", sim[0].address, "--timeout", "30"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "Stopped first, second" in out and "left running" in out and "unrelated" in out
    assert list(serve.status().applications) == ["unrelated"]
    assert requests.post("http://127.0.0.1:8000/unrelated", timeout=30).text == "finished"

    code = stop_service.main(["--address", sim[0].address, "--timeout", "30"])
    assert code == EXIT_OK and "no application of this project" in capsys.readouterr().out
    code = stop_service.main(["--address", sim[0].address, "--timeout", "30", "--all",
                              "--shutdown"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "Stopped unrelated" in out and "shut down" in out
    assert serve.status().applications == {}


def test_a_controller_that_does_not_answer_fails_the_stop(sim, capsys, monkeypatch):
    serve.run(ours("A").bind(), name="kept", route_prefix="/kept")

    def unreadable(client):
        raise TimeoutError("the controller did not answer")

    monkeypatch.setattr(ray_compat, "serve_details", unreadable)
    code = stop_service.main(["--address", sim[0].address, "--timeout", "10"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert "could not read Serve's state" in err and "did not answer" in err
    monkeypatch.undo()
    assert "kept" in serve.status().applications
    serve.delete("kept")


def test_unreachable_exits_3():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "stop_service.py"), "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == EXIT_RAY_UNREACHABLE, proc.stderr
    assert "Traceback" not in proc.stderr and "ray start --head" in proc.stderr
    assert time.monotonic() - start < 20
