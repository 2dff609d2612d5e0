"""The chaos run's short form on a real 2-node `ray start` cluster: a few faults under steady load, every request accounted for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.reliability
def test_short_chaos_run_meets_its_goal(tmp_path):
    out = tmp_path / "chaos.json"
    # The goals' figures depend on the machine's speed, so here they are reported, not held:
    # recovery has no time limit (each fault must still be followed by answers from both
    # nodes), and the share answered only a floor far below `make chaos`'s 99.5% (requests that
    # reach a replica between its engine's death and its exit get a clear 503, and how many
    # do depends on how fast a loaded machine notices). What is held exactly: nothing hung, no
    # stream cut and no failure without a clear error away from a killed process, no failure
    # during planned operations.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--minutes", "3",
         "--fault-every", "40", "--first-fault", "20", "--recovery-goal", "1e9",
         "--answered-goal", "97", "--json", str(out)],
        capture_output=True, text=True, timeout=1500, cwd=ROOT)
    print(proc.stdout)
    print(proc.stderr[-6000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    run = json.loads(out.read_text())
    names = [f["name"] for f in run["faults"]]
    assert names == ["kill_replica", "kill_engine", "restart_node", "redeploy", "stop"]
    assert all(f["error"] is None for f in run["faults"])
    verdict = run["verdict"]
    assert verdict["hung"] == 0 and verdict["failed_in_planned"] == 0
    assert verdict["cut_elsewhere"] == 0 and verdict["unclear"] == 0
