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


def test_the_plain_proxy_takes_the_servers_in_turn():
    config = rb.haproxy_config(8100, [9001, 9002])
    assert "bind 127.0.0.1:8100" in config and "balance roundrobin" in config
    assert "server s0 127.0.0.1:9001" in config and "server s1 127.0.0.1:9002" in config


def test_every_turn_gets_a_document_of_its_own(tmp_path):
    lines = rb._distinct_prompts(tmp_path, 3, words=20).read_text().splitlines()
    assert len(lines) == 3 and len(set(line.split(" Question")[0] for line in lines)) == 3
    assert all(len(line.split()) == 20 + 7 for line in lines)
    assert rb._distinct_prompts(tmp_path, 2).read_text().startswith("Question 0:")


def test_runs_kept_apart_are_reported_as_one(tmp_path):
    args = vars(rb.build_parser().parse_args(["--device", "cuda", "--model", "m"]))
    for run, ttfts in enumerate(([0.4, 0.2], [0.6, 0.3])):
        with open(tmp_path / f"run{run}.jsonl", "w") as out:
            for routing, ttft in zip(("spread", "prefix"), ttfts):
                sample = rb.Sample(routing, "conversations", 0, ttft, None, 100.0, 0, None,
                                   None, 1)
                out.write(rb.json.dumps({"args": args, "sample": rb.asdict(sample)}) + "\n")
    namespace = rb.argparse.Namespace(out=str(tmp_path))
    assert rb.from_partial([str(tmp_path / "run0.jsonl"), str(tmp_path / "run1.jsonl")],
                           namespace) == 0
    written = rb.json.loads(next(tmp_path.glob("routing-cuda-*.json")).read_text())
    assert [s["repetition"] for s in written["samples"]] == [0, 0, 1, 1]
    prefix = [r for r in written["rows"] if r["routing"] == "prefix"][0]
    assert prefix["ttft_p50_s"] == 0.25 and abs(prefix["ratios"]["ttft_p50"] - 0.5) < 1e-9
    assert "2 repetitions" in next(tmp_path.glob("routing-cuda-*.md")).read_text()
