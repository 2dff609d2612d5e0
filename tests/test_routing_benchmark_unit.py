"""Unit tests of the routing benchmark's arithmetic: a sample from the tools' JSON, medians and ratios, the table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import routing_benchmark as rb


def load_json(ttft, turns=None, one_node=None, failures=0, tok_s=100.0):
    summary = {"ttft": {"p50": ttft}, "output_token_throughput": tok_s, "failures": failures,
               "conversation": None}
    if turns is not None:
        summary["conversation"] = {
            "multi_turn": 4, "one_node": one_node,
            "by_turn": [{"first_token": {"p50": t}} for t in turns]}
    return {"summary": summary, "nodes": [{"count": 5}, {"count": 0}]}


def test_a_sample_takes_later_turns_one_node_share_and_the_hit_rate():
    sample = rb.sample_from("session", "conversations", 0,
                            load_json(0.2, turns=[0.4, 0.1, 0.3, 0.2], one_node=4),
                            {"r1": {"prefix_queries": 100.0, "prefix_hits": 80.0},
                             "r2": {"prefix_queries": 100.0, "prefix_hits": 40.0}})
    assert sample.later_turns_ttft_p50_s == 0.2 and sample.one_node_share == 1.0
    assert sample.prefix_hit_rate == 0.6 and sample.nodes_answering == 1
    plain = rb.sample_from("spread", "independent", 0, load_json(0.3), {})
    assert plain.later_turns_ttft_p50_s is None and plain.prefix_hit_rate is None


def test_rows_are_medians_with_ratios_to_the_first_routing():
    samples = [rb.Sample("spread", "conversations", r, 0.4 + r / 10, 0.6, 100.0, 0, 0.5, 0.3, 2)
               for r in range(3)]
    samples += [rb.Sample("session", "conversations", r, 0.2, 0.15, 110.0, 0, 1.0, 0.9, 2)
                for r in range(3)]
    samples += [rb.Sample("spread", "independent", 0, 0.3, None, 200.0, 0, None, 0.2, 2),
                rb.Sample("session", "independent", 0, 0.3, None, 198.0, 1, None, 0.2, 2)]
    table = rb.rows(samples, ["spread", "session"])
    assert [(r.workload, r.routing) for r in table] == [
        ("conversations", "spread"), ("conversations", "session"),
        ("independent", "spread"), ("independent", "session")]
    spread, session = table[0], table[1]
    assert spread.ttft_p50_s == 0.5 and spread.ratios["ttft_p50"] == 1.0
    assert session.ratios["ttft_p50"] == 0.4 and session.ratios["later_turns_ttft_p50"] == 0.25
    assert abs(session.ratios["output_tok_s"] - 1.1) < 1e-9
    assert table[3].failures == 1 and table[3].ratios["later_turns_ttft_p50"] is None
    text = rb.markdown(table, argparse.Namespace(conversations=16, turns=4,
                                                 system_prompt_words=300, max_tokens=32,
                                                 concurrency=4, repetitions=3))
    assert "| conversations | session | 200 | 150 | 110.0 | 100% | 90% | 0 | 0.400 | 0.250 |" \
        in text
    assert "| independent | session | 300 | - | 198.0 | - | 20% | 1 | 1.000 | - | 0.990 |" in text
