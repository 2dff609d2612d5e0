"""load_test.py --report against a fake 2-node service with one idle node and errors, opened in headless Chromium."""
from __future__ import annotations

import json

import load_test
from _browser import inspect_report
from common.cli import EXIT_FAILURE
from test_load_test_unit import NODE_A, NODE_B, FakeService


def test_report_page_shows_the_idle_node_and_errors(tmp_path, capsys):
    # Node B holds a replica (GET /nodes says so) but every answer comes from node A;
    # every 7th request is refused with 503.
    fake = FakeService(node_pattern=(NODE_A,), replica_nodes={NODE_A: 1, NODE_B: 1},
                       fail_every=7, tokens=6).start()
    report, result = tmp_path / "report.html", tmp_path / "result.json"
    try:
        code = load_test.main(["--url", fake.url, "--no-progress", "-c", "4", "-n", "70",
                               "--stream", "--json", str(result), "--report", str(report)])
    finally:
        fake.stop()
    text = capsys.readouterr().out
    assert code == EXIT_FAILURE                      # the 503s: the exit status is unchanged
    assert "Load Test Result" in text and "answered nothing" in text
    assert json.loads(result.read_text())["summary"]["failures"] == 10

    screenshot = tmp_path / "report.png"
    seen = inspect_report(report, screenshot)
    print(f"report: {report}\nscreenshot: {screenshot}\n{json.dumps(seen, indent=1)}")
    assert seen["errors"] == [], seen["errors"]
    assert seen["drawn"] and seen["external"] == []
    assert {"latency-e2el", "latency-ttft", "latency-tpot", "latency-itl", "timeline",
            "per-node", "errors-over-time"} <= set(seen["plots"])
    assert seen["node_bars"] == 2                     # one bar per node, the idle one included
    assert seen["bar_texts"][1] == "0 — IDLE" and seen["bar_texts"][0].startswith("60 ")
    assert seen["bar_colors"][0] != seen["bar_colors"][1]
    assert any(NODE_B in warning for warning in seen["warnings"])
    assert screenshot.stat().st_size > 10_000
