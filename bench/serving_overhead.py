"""CPU overhead benchmark: 1-token latency of the engine in-process vs over HTTP, and the router hop."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.serving_benchmark import (DEMO_MODEL, HOST, RESULTS_DIR, SERVED_NAME,  # noqa: E402
                                     clean_env, free_port, log, machine_info, ray_token_env,
                                     ready_helper, stop_group, wait_http)
from loadgen.client import DEFAULT_PROMPT  # noqa: E402

EPILOG = """what is measured (sequential requests, concurrency 1, max_tokens 1, the same prompt):
  in-process      replica.engine.build_engine (vLLM AsyncLLM) called in one process: tokenize +
                  generate, no HTTP, no Ray
  vllm-serve      `vllm serve` on the same model and settings, POST /v1/completions
  proxy /         ray-single-gpu.py --device cpu, one replica, Serve's Python proxy, POST /
  proxy /v1       the same service, POST /v1/completions (vLLM's endpoint in the replica)
  haproxy /, /v1  the same with --ingress haproxy (Serve's HAProxy + direct ingress)
  router-proxy,   ray-placement-group.py --device cpu --num-backends 1: the RoundRobinRouter
  router-haproxy  deployment in front of one LLMBackend (the extra hop), POST /, each ingress
  backend-proxy,  the same service's backend called on its own HTTP server (--backend-port),
  backend-haproxy POST /: what the router forwards to
Rows of one service alternate their endpoints round by round. Derived: each served row minus
vllm-serve; the router hop (router - proxy /, per ingress: two services, one after the other);
the router path (router - backend, per ingress: one service, one engine, rounds alternating),
i.e. the ingress (HAProxy or Serve's proxy) plus the router replica; p50 and p99.

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/serving_overhead.py
"""
INGRESSES = ("proxy", "haproxy")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        k = (len(ordered) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"p50_ms": pick(0.5) * 1000, "p99_ms": pick(0.99) * 1000,
            "mean_ms": statistics.fmean(ordered) * 1000, "count": len(ordered)}


# ---------------------------------------------------------------------------------------------
# In-process engine (`serving_overhead.py _inprocess N WARMUP MODEL OUT`)


def inprocess_main(n: int, warmup: int, model: str, out: str) -> int:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from replica.config import EngineConfig, apply_cpu_defaults
    from replica.engine import build_engine
    from replica.vllm_app import serve_args

    config = apply_cpu_defaults(EngineConfig(model=model, device="cpu", max_model_len=512))

    async def run() -> list[float]:
        engine = build_engine(config, serve_args(config.engine_kwargs()))
        tokenizer = engine.get_tokenizer()
        if asyncio.iscoroutine(tokenizer):
            tokenizer = await tokenizer
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        times = []
        for i in range(warmup + n):
            started = time.perf_counter()
            ids = tokenizer.encode(DEFAULT_PROMPT, add_special_tokens=True)
            async for _ in engine.generate({"prompt_token_ids": ids}, params, f"r{i}"):
                pass
            if i >= warmup:
                times.append(time.perf_counter() - started)
        engine.shutdown()
        return times

    times = asyncio.run(run())
    Path(out).write_text(json.dumps(times))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver


def engine_env(workdir: Path) -> dict[str, str]:
    from replica.config import CPU_ENGINE_ENV
    (workdir / "tmp").mkdir(exist_ok=True)
    return {**CPU_ENGINE_ENV, **ray_token_env(workdir), "TMPDIR": str(workdir / "tmp"),
            "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "TRANSFORMERS_OFFLINE": "1"}


def load(port: int, n: int, workdir: Path, name: str, endpoint: str = "/") -> list[float]:
    out = workdir / f"{name.replace('/', '_')}-{time.time_ns()}.json"
    command = [sys.executable, str(REPO_ROOT / "load_test.py"), "--url", f"http://{HOST}:{port}",
               "--endpoint", endpoint, "--model", SERVED_NAME,
               "-c", "1", "-n", str(n), "--max-tokens", "1", "--temperature", "0",
               "--ignore-eos", "--no-progress", "--json", str(out), "--json-requests"]
    completed = subprocess.run(command, env=clean_env(), cwd=REPO_ROOT, capture_output=True,
                               text=True)
    if not out.exists():
        raise RuntimeError(f"load_test.py failed: {completed.stderr[-800:]}")
    data = json.loads(out.read_text())
    return [r["latency"] for r in data["requests"] if r["ok"]]


def measure(port: int, endpoints: dict[str, str | tuple[int, str]], n: int, warmup: int,
            rounds: int, workdir: Path) -> dict[str, list[float]]:
    """Rows of one running service: {row: endpoint on `port`, or (another port, endpoint)},
    alternating the rows round by round."""
    targets = {row: value if isinstance(value, tuple) else (port, value)
               for row, value in endpoints.items()}
    for row, (row_port, endpoint) in targets.items():
        load(row_port, warmup, workdir, f"{row}-warmup", endpoint)
    times: dict[str, list[float]] = {row: [] for row in targets}
    for _ in range(rounds):
        for row, (row_port, endpoint) in targets.items():
            times[row] += load(row_port, n, workdir, row, endpoint)
    return times


def served(script: str, args: list[str], endpoints: dict[str, str | tuple[int, str]], n: int,
           warmup: int, rounds: int, workdir: Path) -> dict[str, list[float]]:
    """Start a deployment script on a Ray head of its own (bench/serving_benchmark.py _ray)."""
    port = free_port()
    script_args = ["--device", "cpu", "--model", args[0], "--max-model-len", "512",
                   "--proxy-location", "HeadOnly", "--host", HOST, "--port", str(port), *args[1:]]
    logpath = workdir / f"{script}-{'-'.join(endpoints)}.log".replace("/", "_").replace(" ", "")
    with ready_helper(["_ray", script, *script_args], engine_env(workdir), logpath, script):
        return measure(port, endpoints, n, warmup, rounds, workdir)


def vllm_served(model: str, n: int, warmup: int, rounds: int, workdir: Path
                ) -> dict[str, list[float]]:
    """`vllm serve` with the settings the deployment scripts give the CPU engine."""
    from replica.config import EngineConfig, apply_cpu_defaults

    config = apply_cpu_defaults(EngineConfig(model=model, device="cpu", max_model_len=512))
    flags = ["--max-model-len", "512", "--enforce-eager", "--seed", "0",
             "--kv-cache-memory-bytes", str(config.kv_cache_memory_bytes)]
    port = free_port()
    command = [sys.executable, str(REPO_ROOT / "bench" / "serving_benchmark.py"), "_vllm",
               "serve", model, "--served-model-name", SERVED_NAME, "--host", HOST, "--port",
               str(port), "--disable-uvicorn-access-log", *flags]
    logpath = workdir / "vllm-serve.log"
    with open(logpath, "w") as logf:
        process = subprocess.Popen(command, env=clean_env(engine_env(workdir)), cwd=REPO_ROOT,
                                   stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://{HOST}:{port}/health", process, 600)
            return measure(port, {"vllm-serve": "/v1/completions"}, n, warmup, rounds, workdir)
        finally:
            stop_group(process)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL), help="model folder (default: %(default)s)")
    parser.add_argument("-n", "--num-requests", type=int, default=200,
                        help="measured requests per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of requests per served target (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests first "
                        "(default: %(default)s)")
    parser.add_argument("--ingresses", default=",".join(INGRESSES),
                        type=lambda v: [x for x in v.split(",") if x],
                        help="the scripts' --ingress values to measure (default: %(default)s)")
    parser.add_argument("--tag", default="", help="file name tag (default: none)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="where the JSON and Markdown go (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="logs (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_inprocess"]:
        return inprocess_main(int(argv[1]), int(argv[2]), argv[3], argv[4])
    args = build_parser().parse_args(argv)
    if not Path(args.model).exists():
        from common.demo_model import ensure_demo_model
        ensure_demo_model(args.model)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serving-overhead-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"logs in {workdir}")
    samples: dict[str, list[float]] = {}
    out = workdir / "inprocess.json"
    log("in-process engine")
    subprocess.run([sys.executable, __file__, "_inprocess", str(args.num_requests * args.rounds),
                    str(args.warmup), args.model, str(out)], env=clean_env(engine_env(workdir)),
                   cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=open(workdir / "inprocess.log", "w"))
    samples["in-process"] = json.loads(out.read_text())
    runs = (args.num_requests, args.warmup, args.rounds, workdir)
    log("vllm serve")
    samples.update(vllm_served(args.model, *runs))
    for ingress in args.ingresses:
        log(f"direct: ray-single-gpu.py --ingress {ingress}")
        samples.update(served("ray-single-gpu.py", [args.model, "--num-replicas", "1",
                                                    "--ingress", ingress],
                              {f"{ingress} /": "/", f"{ingress} /v1": "/v1/completions"}, *runs))
        log(f"router: ray-placement-group.py --num-backends 1 --ingress {ingress}")
        backend_port = free_port()
        samples.update(served("ray-placement-group.py",
                              [args.model, "--num-backends", "1", "--tensor-parallel-size", "1",
                               "--ingress", ingress, "--backend-port", str(backend_port)],
                              {f"router-{ingress}": "/",
                               f"backend-{ingress}": (backend_port, "/")}, *runs))
    stats = {name: percentiles(values) for name, values in samples.items()}
    reference = stats["vllm-serve"]
    derived = {f"{row} - vllm-serve": {k: stats[row][k] - reference[k]
                                      for k in ("p50_ms", "p99_ms")}
               for row in stats if row not in ("in-process", "vllm-serve")}
    for ingress in args.ingresses:
        derived[f"router hop, {ingress} (router-{ingress} - {ingress} /)"] = {
            k: stats[f"router-{ingress}"][k] - stats[f"{ingress} /"][k]
            for k in ("p50_ms", "p99_ms")}
        derived[f"router path, {ingress} (router-{ingress} - backend-{ingress})"] = {
            k: stats[f"router-{ingress}"][k] - stats[f"backend-{ingress}"][k]
            for k in ("p50_ms", "p99_ms")}
    result = {"benchmark": "serving_overhead",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(),
              "parameters": {"model": os.path.relpath(args.model, REPO_ROOT),
                             "num_requests": args.num_requests, "rounds": args.rounds,
                             "warmup": args.warmup, "max_tokens": 1, "concurrency": 1,
                             "ingresses": args.ingresses,
                             "prompt": DEFAULT_PROMPT},
              "command": "python bench/serving_overhead.py " + " ".join(argv),
              "latency": stats, "derived": derived}
    lines = [f"# Serving-path overhead, CPU ({result['date']})", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs; " +
             ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items()), "",
             f"1-token requests (max_tokens 1), one at a time, {args.num_requests} x "
             f"{args.rounds} measured per target after {args.warmup} warm-up; demo model.", "",
             "| target | requests | p50 (ms) | p99 (ms) | mean (ms) |", "|---|---|---|---|---|"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['count']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['mean_ms']:.2f} |")
    lines += ["", "| derived | p50 (ms) | p99 (ms) |", "|---|---|---|"]
    for name, d in derived.items():
        lines.append(f"| {name} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} |")
    lines += ["", f"Command: `scripts/loopback.sh {result['command']}`"]
    text = "\n".join(lines) + "\n"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    base = results_dir / f"serving_overhead-cpu{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    base.with_suffix(".md").write_text(text)
    log(f"wrote {base}.json and .md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
