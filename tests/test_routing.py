"""Session and prefix routing on a real 2-node `ray start` cluster (token auth, the head hosting a replica): every turn of a conversation lands on one replica while the conversations reach both nodes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import local_cluster

from _serve_fixtures import demo_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("routing, header", [("session", True), ("prefix", False)])
def test_a_conversations_turns_stay_on_one_replica_while_both_nodes_serve(tmp_path, routing,
                                                                          header):
    """--routing session by the x-session-id header; --routing prefix from the messages alone
    (the turns carry no header), its route deployment consulted by HAProxy for every request."""
    base = Path(tempfile.mkdtemp(prefix="routing-", dir="/tmp"))
    cluster = local_cluster.LocalCluster(base, cpus=2)
    try:
        cluster.start()
        cluster.script("ray-force-multi.py", "--device", "cpu", "--model", demo_model(),
                       "--max-model-len", "512", "--tensor-parallel-size", "1",
                       "--num-replicas", "2", "--host", "127.0.0.1",
                       "--port", str(cluster.http_port), "--proxy-location", "HeadOnly",
                       "--app-name", "routing", "--timeout", "600", "--routing", routing)
        out = tmp_path / "run.json"
        # Each conversation asks its own questions (with one prompt for all, every first turn
        # is the same request: nothing but a header could tell the conversations apart).
        questions = tmp_path / "questions.txt"
        questions.write_text("".join(f"Question {i}: what is {i} times {i + 7}?\n"
                                     for i in range(48)))
        proc = subprocess.run(
            [sys.executable, "load_test.py", "--url", cluster.url, "--conversations", "16",
             "--turns", "3", "-c", "4", "--max-tokens", "8", "--system-prompt-words", "60",
             "--expected-nodes", "2", "--no-progress", "--json", str(out),
             "--prompt-file", str(questions), *([] if header else ["--no-session-header"])],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
        print(proc.stdout)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        data = json.loads(out.read_text())
        turns = data["summary"]["conversation"]
        assert turns["completed"] == 16
        assert turns["one_node"] == turns["multi_turn"] == 16, turns
        assert len([n for n in data["nodes"] if n["count"] > 0]) == 2, data["nodes"]
        if routing == "prefix":
            # check_cluster.py lists the route deployment beside the engine replicas.
            report = cluster.report("routing")
            assert "PrefixRoute" in report["apps"]["routing"]["deployments"], report["apps"]
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
