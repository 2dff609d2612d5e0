"""Routing side by side on a local 2-node cluster: --routing spread vs session vs prefix on multi-turn conversations and on independent prompts, ratios from one run."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from common import cli  # noqa: E402 - after the path setup above

EPILOG = """the run (CPU engines, the demo model, two raylets on this machine with token auth):
  for each repetition, for each --routings value in turn: Serve started afresh with it
  (stop_service.py --shutdown, then ray-force-multi.py --num-replicas 2 --routing X: new
  replicas, empty prefix caches), then load_test.py on the conversation workload
  (--conversations x --turns, a shared --system-prompt-words system prompt, streamed; the
  x-session-id header only under session routing, which needs it) and on independent prompts (the same count of single requests); each replica's prefix-cache hit
  rate from check_cluster.py --json after each workload.
  Reported: medians over the repetitions, and each routing's ratio to the first.

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/routing_benchmark.py
"""
APP = "routing"
WORKLOADS = ("conversations", "independent")


@dataclass
class Sample:
    """One workload run under one routing."""

    routing: str
    workload: str
    repetition: int
    ttft_p50_s: float | None
    later_turns_ttft_p50_s: float | None   # turns after the first (conversations only)
    output_tok_s: float
    failures: int
    one_node_share: float | None
    prefix_hit_rate: float | None
    nodes_answering: int


@dataclass
class Row:
    routing: str
    workload: str
    runs: int
    ttft_p50_s: float | None
    later_turns_ttft_p50_s: float | None
    output_tok_s: float | None
    one_node_share: float | None
    prefix_hit_rate: float | None
    failures: int
    ratios: dict[str, float | None] = field(default_factory=dict)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def rows(samples: list[Sample], routings: list[str]) -> list[Row]:
    """Medians per (workload, routing), with each routing's ratios to the first routing."""
    out = []
    for workload in WORKLOADS:
        base: Row | None = None
        for routing in routings:
            runs = [s for s in samples if s.routing == routing and s.workload == workload]
            if not runs:
                continue
            row = Row(routing, workload, len(runs),
                      _median([s.ttft_p50_s for s in runs]),
                      _median([s.later_turns_ttft_p50_s for s in runs]),
                      _median([s.output_tok_s for s in runs]),
                      _median([s.one_node_share for s in runs]),
                      _median([s.prefix_hit_rate for s in runs]),
                      sum(s.failures for s in runs))
            base = base or row
            row.ratios = {"ttft_p50": _ratio(row.ttft_p50_s, base.ttft_p50_s),
                          "later_turns_ttft_p50": _ratio(row.later_turns_ttft_p50_s,
                                                         base.later_turns_ttft_p50_s),
                          "output_tok_s": _ratio(row.output_tok_s, base.output_tok_s)}
            out.append(row)
    return out


def sample_from(routing: str, workload: str, repetition: int, load: dict,
                engine: dict) -> Sample:
    """A Sample from load_test.py's --json and check_cluster.py --json's engine section."""
    summary = load["summary"]
    conversation = summary.get("conversation")
    later = None
    if conversation:
        turns = [t["first_token"]["p50"] for t in conversation["by_turn"][1:]
                 if t["first_token"]["p50"] is not None]
        later = statistics.median(turns) if turns else None
    queries = sum(e.get("prefix_queries", 0.0) for e in engine.values())
    hits = sum(e.get("prefix_hits", 0.0) for e in engine.values())
    share = None
    if conversation and conversation["multi_turn"]:
        share = conversation["one_node"] / conversation["multi_turn"]
    return Sample(routing, workload, repetition, (summary.get("ttft") or {}).get("p50"), later,
                  summary["output_token_throughput"], summary["failures"], share,
                  hits / queries if queries else None,
                  sum(1 for n in load["nodes"] if n["count"] > 0))


def markdown(table: list[Row], args: argparse.Namespace) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    def num(value: float | None, pattern: str = "{:.3f}") -> str:
        return "-" if value is None else pattern.format(value)

    lines = [f"# Routing on a local 2-node cluster ({time.strftime('%Y-%m-%d')})", "",
             f"ray-force-multi.py --num-replicas 2 --device cpu, the demo model; "
             f"{args.conversations} conversations x {args.turns} turns, a "
             f"{args.system_prompt_words}-word shared system prompt, {args.max_tokens} tokens "
             f"per answer, streamed, concurrency {args.concurrency}; independent prompts: the "
             f"same number of single requests. Medians of {args.repetitions} repetitions, "
             "routings interleaved, Serve started afresh for each run.", "",
             "| workload | routing | TTFT p50 (ms) | later turns TTFT p50 (ms) | output tok/s | "
             "turns on one node | prefix-cache hits | failed | TTFT ratio | later turns ratio "
             "| tok/s ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r.workload} | {r.routing} | {ms(r.ttft_p50_s)} | "
            f"{ms(r.later_turns_ttft_p50_s)} | {num(r.output_tok_s, '{:.1f}')} | "
            f"{num(r.one_node_share, '{:.0%}')} | {num(r.prefix_hit_rate, '{:.0%}')} | "
            f"{r.failures} | {num(r.ratios.get('ttft_p50'))} | "
            f"{num(r.ratios.get('later_turns_ttft_p50'))} | {num(r.ratios.get('output_tok_s'))} |")
    lines += ["", "Command: `" + " ".join(["python", "bench/routing_benchmark.py",
                                            *sys.argv[1:]]) + "`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> int:
    import local_cluster

    from common.demo_model import ensure_demo_model

    model = str(ensure_demo_model(quiet=True))
    routings = args.routings.split(",")
    base = Path(tempfile.mkdtemp(prefix="routing-bench-", dir="/tmp"))
    cluster = local_cluster.LocalCluster(base, args.cpus_per_node)
    samples: list[Sample] = []
    try:
        print(f"cluster in {base}: starting two raylets", file=sys.stderr, flush=True)
        cluster.start()
        for repetition in range(args.repetitions):
            for routing in routings:
                cluster.script("stop_service.py", "--all", "--shutdown", check=False)
                print(f"[rep {repetition + 1}] deploying with --routing {routing}",
                      file=sys.stderr, flush=True)
                cluster.script("ray-force-multi.py", "--device", "cpu", "--model", model,
                               "--max-model-len", str(args.max_model_len),
                               "--tensor-parallel-size", "1", "--num-replicas", "2",
                               "--host", "127.0.0.1", "--port", str(cluster.http_port),
                               "--proxy-location", "HeadOnly", "--app-name", APP,
                               "--timeout", "600", "--routing", routing)
                for workload in WORKLOADS:
                    samples.append(_one(cluster, args, routing, workload, repetition, base))
                    print(f"  {workload}: {asdict(samples[-1])}", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    table = rows(samples, routings)
    text = markdown(table, args)
    print(text)
    stem = Path(args.out) / f"routing-cpu-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "samples": [asdict(s) for s in samples],
         "rows": [asdict(r) for r in table]}, indent=1))
    print(f"wrote {stem}.md and .json", file=sys.stderr)
    return cli.EXIT_OK if all(s.failures == 0 for s in samples) else cli.EXIT_FAILURE


def _one(cluster, args: argparse.Namespace, routing: str, workload: str, repetition: int,
         base: Path) -> Sample:
    before = _engine(cluster)
    out = base / f"{routing}-{workload}-{repetition}.json"
    prompts = str(_distinct_prompts(base, args.conversations * args.turns))
    shape = (["--conversations", str(args.conversations), "--turns", str(args.turns)]
             if workload == "conversations" else
             ["-n", str(args.conversations * args.turns), "--endpoint", "/v1/chat/completions"])
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "load_test.py"), "--url", cluster.url, *shape,
         "-c", str(args.concurrency), "--max-tokens", str(args.max_tokens), "--ignore-eos",
         "--stream", "--system-prompt-words", str(args.system_prompt_words),
         "--prompt-file", prompts,
         # Only session routing reads the conversation's header; the others get none.
         *([] if routing == "session" else ["--no-session-header"]),
         "--expected-nodes", "2", "--no-progress", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        raise RuntimeError(f"load_test.py wrote no result: {proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    after = _settled_engine(cluster, before)
    # The counters grow over the app's life: this workload's share is the difference.
    engine = {replica: {key: after[replica].get(key, 0.0) - before.get(replica, {}).get(key, 0.0)
                        for key in ("prefix_queries", "prefix_hits")} for replica in after}
    return sample_from(routing, workload, repetition, json.loads(out.read_text()), engine)


def _settled_engine(cluster, before: dict, timeout_s: float = 60.0) -> dict:
    """The engine counters once the workload's have arrived: Ray's metrics agents export
    every few seconds, so read until two reads agree and the prefix-cache queries moved."""
    def queries(engine: dict) -> float:
        return sum(e.get("prefix_queries", 0.0) for e in engine.values())

    deadline = time.monotonic() + timeout_s
    last = _engine(cluster)
    while time.monotonic() < deadline:
        time.sleep(5.0)
        now = _engine(cluster)
        if now == last and queries(now) > queries(before):
            return now
        last = now
    print("  warning: the engine counters did not settle; prefix-cache hits may be short",
          file=sys.stderr, flush=True)
    return last


def _engine(cluster) -> dict:
    return cluster.report(APP).get("engine_metrics") or {}


def _distinct_prompts(base: Path, count: int) -> Path:
    """Questions of their own: each independent request, and each turn, asks another."""
    path = base / "distinct-prompts.txt"
    path.write_text("".join(f"Question {i}: what is {i} times {i + 7}?\n" for i in range(count)))
    return path


_NUMBER_FLAGS = (
    ("--conversations", int, 16, "conversations (and, for the independent workload, "
                                 "conversations x turns single requests)"),
    ("--turns", int, 4, "turns per conversation"),
    ("--system-prompt-words", int, 300, "words of the system prompt every request shares"),
    ("--max-tokens", int, 32, "tokens per answer (ignore_eos: exactly this many)"),
    ("--concurrency", int, 4, "requests in flight"),
    ("--repetitions", int, 2, "repetitions; the routings are interleaved in each"),
    ("--max-model-len", int, 2048, "context length of the replicas"),
    ("--cpus-per-node", int, 2, "logical CPUs each raylet offers"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routings", default="spread,session,prefix",
                        help="routings to compare, the first is the base of the ratios "
                             "(default: %(default)s)")
    for flag, kind, default, text in _NUMBER_FLAGS:
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"),
                        help="folder for the .md and .json results (default: bench/results)")
    return parser


@cli.exits_with_codes
def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
