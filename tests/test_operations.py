"""Operations on the real vLLM CPU engine behind Ray Serve: metrics, R1 reasoning, tracing, updates."""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import os
import shutil
import tempfile
import threading
import time

import pytest
import requests

from _serve_fixtures import LOCAL_IP, cpu_args, deploy_script, free_port, wait_until

import ray
from ray import serve

from common import cluster
from ops import metrics_scrape
from loadgen.client import LoadConfig, run_load_sync, summarize

APP = "ops"
# The deployment as the module deploys it; later tests redeploy it with one flag changed.
BASE_FLAGS = ["--app-name", APP, "--num-replicas", "1", "--cpus-per-replica", "0.5",
              "--max-surge-percent", "100", "--max-model-len", "1024"]


class Ops:
    def __init__(self, port: int, metrics_port: int, session_dir: str):
        self.port = port
        self.url = f"http://{LOCAL_IP}:{port}"
        self.metrics_url = f"http://{LOCAL_IP}:{metrics_port}/metrics"
        self.session_dir = session_dir
        self.found_seed: int | None = None   # a chat seed whose output has </think> mid-way
        self.found_body: dict | None = None

    def deploy(self, *extra: str, script: str = "ray-single-gpu.py") -> int:
        return deploy_script(script, *cpu_args(self.port, *BASE_FLAGS, *extra))


@pytest.fixture(scope="module")
def ops():
    # Workers report metrics to the node's agent every 10 s by default; 1 s keeps the test short.
    saved = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # A private temp dir: `address="local"` and its own ray_current_cluster file keep this
    # cluster apart from any other Ray on the machine.
    temp_dir = tempfile.mkdtemp(prefix="ray-ops-", dir="/tmp")
    port, metrics_port = free_port(), free_port()
    ray.init(address="local", _temp_dir=temp_dir, num_cpus=4, _node_ip_address=LOCAL_IP,
             include_dashboard=False, _metrics_export_port=metrics_port, namespace="serve",
             logging_level="WARNING", log_to_driver=False)
    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        state = Ops(port, metrics_port, session_dir)
        assert state.deploy() == 0
        yield state
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, data=json.dumps(body), timeout=120,
                         headers={"Content-Type": "application/json",
                                  **kwargs.pop("headers", {})}, **kwargs)


def running_replicas(app: str = APP) -> list[str]:
    return sorted(r.replica_id for r in cluster.list_replicas(app) if r.state == "RUNNING")


# ---- request tracing ------------------------------------------------------------------------


def test_request_id_is_returned_and_logged_without_text(ops):
    secret = "zebra violet lighthouse"
    response = post(f"{ops.url}/", {"prompt": secret, "max_tokens": 5, "ignore_eos": True},
                    headers={"X-Request-Id": "my-trace-123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "my-trace-123"
    assert response.json()["id"] == "cmpl-my-trace-123"

    chat = post(f"{ops.url}/v1/chat/completions",
                {"messages": [{"role": "user", "content": secret}], "max_tokens": 3},
                headers={"X-Request-Id": "my-trace-124"})
    assert chat.headers["x-request-id"] == "my-trace-124"
    assert chat.json()["id"] == "chatcmpl-my-trace-124"

    # Without a client ID, Serve makes one: header and body still agree.
    plain = post(f"{ops.url}/", {"prompt": "hello", "max_tokens": 2})
    assert plain.json()["id"] == "cmpl-" + plain.headers["x-request-id"]

    # Serve's access log line in the replica's log names each request by its ID.
    logs = os.path.join(ops.session_dir, "logs", "serve")

    def logged():
        files = glob.glob(os.path.join(logs, "replica_*.log"))
        text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
        return text if "my-trace-123" in text and "my-trace-124" in text else None

    try:
        replica_logs = wait_until(logged, timeout=30, what="request IDs in the replica logs")
    except AssertionError:
        files = glob.glob(os.path.join(logs, "replica_*.log"))
        tail = "".join(open(f, encoding="utf-8", errors="replace").read()[-3000:] for f in files)
        pytest.fail(f"no log line for the request IDs in {files}:\n{tail}")
    every_serve_log = "".join(open(f, encoding="utf-8", errors="replace").read()
                              for f in glob.glob(os.path.join(logs, "*")) if os.path.isfile(f))
    assert secret not in every_serve_log and secret not in replica_logs


# ---- metrics --------------------------------------------------------------------------------

COUNTERS = (metrics_scrape.REQUEST_SUCCESS, metrics_scrape.PROMPT_TOKENS,
            metrics_scrape.GENERATION_TOKENS, "ray_vllm_e2e_request_latency_seconds_count",
            "ray_vllm_time_to_first_token_seconds_count")


def engine_totals(ops) -> dict[str, float]:
    samples, errors = metrics_scrape.scrape([ops.metrics_url])
    assert not errors
    totals = {name: metrics_scrape.total(samples, name, application=APP) for name in COUNTERS}
    totals["serve"] = metrics_scrape.total(samples, metrics_scrape.SERVE_REQUESTS,
                                           application=APP, deployment="LLMDeployment")
    return totals


def assert_totals_move_by(ops, before: dict[str, float], want: dict[str, float]) -> None:
    """Waits until the exported totals have moved from `before` by exactly `want`."""
    def delta() -> dict[str, float]:
        now = engine_totals(ops)
        return {k: now[k] - before[k] for k in want}

    try:
        wait_until(lambda: delta() == want, timeout=45,
                   what="exported counters to match what was sent")
    except AssertionError:
        pytest.fail(f"want {want}, got {delta()}")


def test_engine_and_serve_metrics_match_what_load_test_sent(ops, capsys):
    # Earlier requests must have reached the exporter before "before" is read.
    time.sleep(3)
    before = engine_totals(ops)
    config = LoadConfig(url=ops.url, num_requests=24, concurrency=4, max_tokens=16,
                        ignore_eos=True, timeout=120)
    summary = summarize(run_load_sync(config))
    assert summary.failures == 0 and summary.successes == 24
    want = {
        metrics_scrape.REQUEST_SUCCESS: 24,
        metrics_scrape.PROMPT_TOKENS: summary.total_prompt_tokens,
        metrics_scrape.GENERATION_TOKENS: summary.total_output_tokens,
        "ray_vllm_e2e_request_latency_seconds_count": 24,
        "ray_vllm_time_to_first_token_seconds_count": 24,
        "serve": 24 + 1,  # and load_test's one GET /nodes after the run
    }
    assert summary.total_output_tokens == 24 * 16
    assert_totals_move_by(ops, before, want)

    # Labels: each engine series names its application, deployment, replica and node.
    # The engine's gauges stay exported while it idles: Ray's agent drops a gauge series not
    # exported again within two report intervals (2 s here) and vLLM sets them only as the
    # engine steps, so without the replica's refresher they would not come back after this
    # sleep. A late export on a busy machine can still drop them for a moment: wait for one
    # scrape with all of them.
    time.sleep(5)
    gauges = (metrics_scrape.RUNNING, metrics_scrape.WAITING, metrics_scrape.KV_CACHE_USAGE)

    def scrape_with_gauges():
        scraped, _ = metrics_scrape.scrape([ops.metrics_url])
        return scraped if set(gauges) <= {s.name for s in scraped} else None

    samples = wait_until(scrape_with_gauges, timeout=30, what="the idle engine's gauges exported")
    idle = metrics_scrape.per_replica(samples)[running_replicas()[0]]
    assert (idle.running, idle.waiting) == (0, 0)
    [replica] = running_replicas()
    [info] = [r for r in cluster.list_replicas(APP) if r.replica_id == replica]
    series = [s for s in samples if s.name == metrics_scrape.REQUEST_SUCCESS
              and s.labels.get("application") == APP]
    assert series and all(s.labels["deployment"] == "LLMDeployment" and
                          s.labels["ReplicaId"] == replica and
                          s.labels["NodeId"] == info.node_id and
                          s.labels["NodeAddress"] == LOCAL_IP and
                          s.labels["model_name"] == "DeepSeek-R1" for s in series)

    # check_cluster.py shows the same numbers per replica.
    from common.demo import load_script

    load_script("check_cluster.py").main(["--app", APP])
    out = capsys.readouterr().out
    engine = out[out.index("ENGINE"):]
    row = next(line for line in engine.splitlines() if replica in line)
    stats = metrics_scrape.per_replica(samples)[replica]
    assert row.split()[0] == f"{APP}/LLMDeployment"
    assert f"{stats.requests_finished:.0f}" in row.split()
    # The KV cache vLLM allocated, in GET /nodes (no planner on CPU: nothing planned).
    nodes = requests.get(f"{ops.url}/nodes", timeout=30).json()
    assert nodes["engine_kv_cache"]["tokens"] > 0
    assert nodes["engine_kv_cache"]["planned_tokens"] is None


# ---- DeepSeek-R1 reasoning ------------------------------------------------------------------


def chat_body(seed: int, stream: bool = False) -> dict:
    # temperature 1 + a seed: reproducible sampling over the random model's whole vocabulary,
    # so some seeds emit </think> part-way (the template already opened <think>).
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 48,
            "temperature": 1.0, "seed": seed, "ignore_eos": True, "stream": stream}


def read_sse(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            events.append(json.loads(line[len(b"data: "):]))
    return events


def test_chat_splits_reasoning_from_answer_on_the_real_engine(ops):
    url = f"{ops.url}/v1/chat/completions"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda s: post(url, chat_body(s)).json(), range(64)))
    # vLLM's deepseek_r1 parser, chosen by `auto` because the demo template opens <think>.
    # Without </think> everything is reasoning (R1's template opened <think>): no content.
    assert any(not b["choices"][0]["message"]["content"] for b in bodies)
    found = [(seed, b) for seed, b in enumerate(bodies)
             if b["choices"][0]["message"]["content"] and
             b["choices"][0]["message"]["reasoning"]]
    assert found, "no seed made the demo model emit </think> mid-output"
    ops.found_seed, ops.found_body = found[0]
    message = ops.found_body["choices"][0]["message"]
    assert "</think>" not in message["reasoning"]

    # The same generation streamed: reasoning deltas, then content deltas, same totals.
    chunks = read_sse(post(url, chat_body(ops.found_seed, stream=True), stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    streamed_reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    streamed_content = "".join(d.get("content") or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (message["reasoning"], message["content"])
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert not any(d.get("reasoning") for d in deltas[first_content + 1:])


def test_post_root_answers_raw_text_in_the_guides_keys_on_an_r1_app(ops):
    raw = post(f"{ops.url}/", {"prompt": "hello", "max_tokens": 8, "temperature": 0}).json()
    assert set(raw["choices"][0]) == {"text", "index", "finish_reason"}


# ---- two applications side by side, reasoning split off --------------------------------------


def squash(text: str, specials: list[str]) -> str:
    """ASCII letters and digits of the text without special tokens: the random model emits
    partial UTF-8 byte sequences, and whether a special token sits between two of them changes
    how they decode (replacement characters or one CJK character), never an ASCII byte."""
    for token in specials:
        text = text.replace(token, "")
    return "".join(c for c in text if c.isascii() and c.isalnum())


def test_second_app_on_its_own_route_with_the_split_off(ops):
    from transformers import AutoTokenizer

    from _serve_fixtures import demo_model

    code = deploy_script("ray-single-gpu.py", *cpu_args(
        ops.port, "--app-name", "ops-b", "--route-prefix", "/b", "--served-model-name", "plain",
        "--reasoning-parser", "none", "--num-replicas", "1", "--cpus-per-replica", "0.5",
        "--max-model-len", "1024"))
    try:
        assert code == 0
        assert [m["id"] for m in requests.get(f"{ops.url}/b/v1/models", timeout=30)
                .json()["data"]] == ["plain"]
        assert [m["id"] for m in requests.get(f"{ops.url}/v1/models", timeout=30)
                .json()["data"]] == ["DeepSeek-R1"]
        if ops.found_seed is None:
            pytest.skip("needs the seed found by the reasoning test")
        body = post(f"{ops.url}/b/v1/chat/completions", chat_body(ops.found_seed)).json()
        message = body["choices"][0]["message"]
        assert not message.get("reasoning") and not message.get("reasoning_content")
        # Same model, prompt and seed: the raw answer is the R1 app's reasoning, the </think>
        # that ended it (an ordinary token, as in R1's tokenizer), and its answer.
        specials = AutoTokenizer.from_pretrained(demo_model()).all_special_tokens
        split = ops.found_body["choices"][0]["message"]
        assert squash(message["content"], specials) == \
            squash(split["reasoning"] + "</think>" + split["content"], specials)
    finally:
        serve.delete("ops-b")


# ---- changing a running deployment ------------------------------------------------------------


class BackgroundLoad:
    """load_test's generator running until stopped, in short rounds so it can stop promptly."""

    def __init__(self, url: str):
        self.url = url
        self.results: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            config = LoadConfig(url=self.url, num_requests=0, duration=2.0, concurrency=3,
                                max_tokens=16, ignore_eos=True, timeout=180)
            self.results.extend(run_load_sync(config).results)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=240)

    def failures(self) -> list:
        return [f"{r.status} {r.error}: {r.message}" for r in self.results if not r.ok]


def deployment_config(app: str = APP) -> dict:
    return cluster._serve_details()["applications"][app]["deployments"]["LLMDeployment"][
        "deployment_config"]


def test_lightweight_change_updates_replicas_in_place_under_load(ops):
    before = running_replicas()
    with BackgroundLoad(ops.url) as load:
        time.sleep(2)
        assert ops.deploy("--max-ongoing-requests", "256") == 0
        time.sleep(2)
    assert load.failures() == [] and len(load.results) > 0
    assert deployment_config()["max_ongoing_requests"] == 256
    assert running_replicas() == before  # same replica: no restart


def test_model_setting_change_is_a_rolling_restart_without_failed_requests(ops):
    before = running_replicas()
    with BackgroundLoad(ops.url) as load:
        time.sleep(2)
        started = time.monotonic()
        # An engine setting reaches the replica's constructor: new replicas must start.
        assert ops.deploy("--max-ongoing-requests", "256", "--seed", "1") == 0
        wait_until(lambda: (lambda now: now and not set(now) & set(before))(running_replicas()),
                   timeout=120, what="old replica replaced")
        took = time.monotonic() - started
        time.sleep(2)
    assert load.failures() == []
    during = [r for r in load.results if r.ok]
    assert len(during) > 0
    after = running_replicas()
    assert len(after) == 1 and after != before
    slowest = max(r.latency for r in during)
    print(f"rolling restart took {took:.0f}s; {len(during)} requests served, 0 failed, "
          f"slowest {slowest:.1f}s")


def test_metrics_of_a_replica_started_by_a_rolling_restart_match_what_was_sent(ops):
    # The replica the previous test started exports its engine metrics too.
    [replica] = running_replicas()
    time.sleep(3)
    before = engine_totals(ops)
    config = LoadConfig(url=ops.url, num_requests=8, concurrency=4, max_tokens=8,
                        ignore_eos=True, timeout=120)
    summary = summarize(run_load_sync(config))
    assert summary.successes == 8
    want = {metrics_scrape.REQUEST_SUCCESS: 8, metrics_scrape.GENERATION_TOKENS: 8 * 8,
            "ray_vllm_time_to_first_token_seconds_count": 8}
    assert_totals_move_by(ops, before, want)
    samples, _ = metrics_scrape.scrape([ops.metrics_url])
    assert metrics_scrape.per_replica(samples)[replica].requests_finished >= 8
