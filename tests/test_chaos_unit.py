"""Unit tests of the chaos run's arithmetic: outcomes, per-fault rows, recovery, the verdict, the schedule."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos
from chaos import ANSWERED, CLEAR, CUT, HUNG, UNCLEAR, Fault, Shot


def test_outcomes_from_loadgen_results():
    assert chaos.classify(True, None, 200, True, "") == ANSWERED
    assert chaos.classify(False, "timeout", 200, True, "") == HUNG
    assert chaos.classify(False, "http_503", 503, False, "replica dead") == CLEAR
    assert chaos.classify(False, "stream_error", 200, True, "engine dead") == CLEAR
    assert chaos.classify(False, "invalid_response", 200, True,
                          "event stream ended without 'data: [DONE]'") == CUT
    assert chaos.classify(False, "payload_error", 200, True, "") == CUT
    assert chaos.classify(False, "server_disconnected", 0, False, "") == UNCLEAR
    assert chaos.classify(False, "connection_error", 0, True, "") == UNCLEAR


def shot(index, sent, ended, outcome=ANSWERED, node="a") -> Shot:
    return Shot(index, "root", sent, ended, outcome, node=node)


def test_recovery_is_when_requests_sent_after_the_fault_reach_both_nodes_again():
    fault = Fault("kill_replica", started_at=9.5, ended_at=10.5, acted_at=10.0, victim_node="b")
    shots = [shot(0, 9.0, 12.0, node="b"),            # sent before the fault: does not count
             shot(1, 11.0, 12.0, node="a"),
             shot(2, 12.0, 13.0, CLEAR, node="a"),
             shot(3, 20.0, 31.0, node="b"),
             shot(4, 21.0, 22.0, node="a")]
    assert chaos.recovery_s(fault, shots) == 21.0
    assert chaos.recovery_s(fault, shots[:3]) is None


def test_failures_on_the_killed_process_are_counted_apart():
    fault = Fault("kill_replica", started_at=9.0, ended_at=10.5, acted_at=10.0, victim_node="b")
    in_flight = shot(0, 9.0, 10.6, CUT, node="b")
    elsewhere = shot(1, 9.0, 10.6, CUT, node="a")
    later = shot(2, 12.0, 12.1, CLEAR, node="b")
    assert chaos.on_killed_process(in_flight, fault)
    assert not chaos.on_killed_process(elsewhere, fault)
    assert not chaos.on_killed_process(later, fault)
    # No answer at all (no node known), in flight between the kill and the process's end.
    nodeless = Shot(3, "root", 9.8, 10.2, UNCLEAR)
    assert chaos.on_killed_process(nodeless, fault)
    assert not chaos.on_killed_process(Shot(4, "root", 11.0, 11.1, UNCLEAR), fault)
    # A replica whose engine was killed ends itself later: the window lasts until it is gone.
    engine = Fault("kill_engine", 9.0, 10.5, acted_at=10.0, victim_node="b", victim_gone_at=12.5)
    assert chaos.on_killed_process(Shot(4, "root", 11.0, 11.1, UNCLEAR), engine)
    assert chaos.on_killed_process(shot(5, 12.0, 12.6, CUT, node="b"), engine)
    assert not chaos.on_killed_process(shot(6, 12.0, 12.6, CUT, node="a"), engine)
    assert not chaos.on_killed_process(Shot(7, "root", 13.0, 13.1, UNCLEAR), engine)


def test_rows_split_requests_by_fault_and_the_verdict_names_what_missed():
    faults = [Fault("kill_replica", 10.0, 10.5, acted_at=10.0, victim_node="b"),
              Fault("redeploy", 30.0, 31.0), Fault("stop", 60.0, 62.0)]
    shots = [shot(0, 9.0, 10.6, CUT, node="b"), shot(1, 11.0, 12.0, node="a"),
             shot(2, 15.0, 16.0, node="b"), shot(3, 31.0, 32.0, CLEAR, node="a"),
             shot(4, 32.0, 33.0, node="a"), shot(5, 33.0, 34.0, node="b"),
             shot(6, 59.0, 63.0, node="a")]
    rows = chaos.fault_rows(faults, shots)
    assert [(r.name, r.requests, r.on_killed) for r in rows] == [
        ("kill_replica", 2, 1), ("redeploy", 4, 0), ("stop", 1, 0)]
    # From the kill; from the end of the operation; none for the stop.
    assert rows[0].recovery_s == 6.0 and rows[1].recovery_s == 3.0 and rows[2].recovery_s is None
    assert rows[1].counts[CLEAR] == 1 and rows[1].planned
    result = chaos.verdict(rows, shots, faults)
    assert result.requests == 7 and result.cut_elsewhere == 0 and result.failed_in_planned == 1
    assert any("during planned operations" in p for p in result.problems)
    assert any("% answered" in p for p in result.problems)
    table = chaos.markdown(rows, result)
    assert "| redeploy (planned) | 30 | 4 | 3 | 1 |" in table and "goal missed" in table


def test_a_clean_run_meets_the_goal():
    faults = [Fault("kill_engine", 10.0, 10.2, victim_node="a"), Fault("stop", 20.0, 21.0)]
    shots = [shot(i, 10.0 + i, 10.5 + i, node="ab"[i % 2]) for i in range(8)]
    rows = chaos.fault_rows(faults, shots)
    result = chaos.verdict(rows, shots, faults)
    assert result.problems == [] and result.answered_pct == 100.0
    assert "goal met" in chaos.markdown(rows, result)


def test_schedule_cycles_the_faults_and_ends_with_stop():
    plan = chaos.schedule(minutes=10, every_s=60, first_s=30)
    names = [name for _, name in plan]
    assert names[:6] == ["kill_replica", "kill_engine", "restart_node", "redeploy",
                         "scale_down", "scale_up"]
    assert names[-1] == "stop" and plan[-1][0] == 600 and len(plan) == 10
    assert all(b[0] - a[0] == 60 for a, b in zip(plan[:-2], plan[1:-1]))
    short = chaos.schedule(minutes=3, every_s=40, first_s=20)
    assert [n for _, n in short] == ["kill_replica", "kill_engine", "restart_node", "redeploy",
                                     "stop"]


def test_a_stop_drains_what_it_holds_and_may_refuse_what_comes_after():
    faults = [Fault("stop", 10.0, 14.0)]
    shots = [shot(0, 9.0, 12.0),                       # in flight, drained
             shot(1, 9.5, 11.0, CLEAR),               # in flight, refused: a failure
             shot(2, 11.0, 11.1, CLEAR),              # sent to the stopping service: refused
             shot(3, 12.0, 12.5, CUT),                # sent after, cut: a failure
             shot(4, 15.0, 15.1, CLEAR)]              # after the stop: not its business
    [row] = chaos.fault_rows(faults, shots)
    assert row.requests == 4 and row.planned_failures == 2


def test_no_recovery_is_asked_after_a_scale_down():
    faults = [Fault("scale_down", 10.0, 12.0), Fault("scale_up", 30.0, 35.0)]
    shots = [shot(0, 13.0, 14.0, node="a"), shot(1, 36.0, 37.0, node="a"),
             shot(2, 38.0, 39.0, node="b")]
    rows = chaos.fault_rows(faults, shots)
    assert rows[0].recovery_s is None and rows[1].recovery_s == 4.0
    assert chaos.verdict(rows, shots, faults).problems == []


def test_each_request_not_answered_is_listed_with_its_error_and_fault():
    faults = [Fault("kill_engine", 10.0, 10.5, acted_at=10.0, victim_node="b"),
              Fault("stop", 60.0, 62.0)]
    shots = [shot(0, 9.0, 10.6, CLEAR, node="b"), shot(1, 11.0, 12.0),
             Shot(2, "chat", 12.0, 12.2, UNCLEAR, 0, "server_disconnected", "Server disconnected"),
             shot(3, 61.0, 61.1, CLEAR)]  # refused by the service being stopped: not listed
    lines = chaos.failure_lines(shots, faults)
    assert len(lines) == 2
    assert "CLEAR" not in lines[0] and "(killed process)" in lines[0] and "under -" in lines[0]
    assert "unclear under kill_engine: server_disconnected status 0 node -: Server disconnected" \
        in lines[1]
    assert chaos.failure_lines(shots, faults, limit=1)[-1].startswith("- ... and 1 more")
    table = chaos.markdown(chaos.fault_rows(faults, shots),
                           chaos.verdict(chaos.fault_rows(faults, shots), shots, faults), lines)
    assert table.rstrip().endswith("Server disconnected")


def test_the_html_report_marks_each_fault_on_the_time_axes(tmp_path):
    import argparse

    from loadgen.client import RequestResult

    results = [RequestResult(i, start=i * 0.5, latency=0.3, ok=i != 5, status=200 if i != 5
                             else 503, error=None if i != 5 else "http_503",
                             node="ab"[i % 2], output_tokens=8) for i in range(40)]
    faults = [Fault("kill_engine", 5.0, 6.0, acted_at=5.5, victim_node="b"),
              Fault("redeploy", 12.0, 15.0)]
    args = argparse.Namespace(rate=2.0, minutes=0.5, max_tokens=16, hung_after=30.0,
                              topology="force-multi")
    path = tmp_path / "chaos.html"
    chaos.write_html_report(str(path), "http://127.0.0.1:1", args, results, faults, 0.0,
                            "| table |")
    page = path.read_text()
    assert "Chaos run against http://127.0.0.1:1" in page and "| table |" in page
    # Plotly writes the markers into each figure's JSON: a line and a label per fault.
    assert page.count('"text":"kill_engine"') == 2 and page.count('"text":"redeploy"') == 2
    assert '"x0":5.5' in page and '"x0":12.0' in page
