"""`make demo`: the demo model on the CPU build behind Ray Serve, deployed and shown answering."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from common import cli
from common.demo_model import ensure_demo_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "请简要介绍人工智能的发展历史"


def load_script(name: str):
    """Import a top-level script (hyphenated or extensionless names) as a module."""
    path = ROOT / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_").replace(".py", ""),
                                                  str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def ray_cli() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def start_local_head(port: int) -> None:
    """A one-node Ray cluster on 127.0.0.1 (all of this machine's CPUs)."""
    cmd = [ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--num-cpus={max(2, os.cpu_count() or 2)}",
           "--disable-usage-stats"]
    print("starting a local Ray head:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--ray-port", env="DEMO_RAY_PORT", type=int, default=6379,
                 help="GCS port of the local Ray head the demo starts when none is running")
    cli.add_flag(parser, "--port", env="SERVE_PORT", type=int, default=8000, help="HTTP port")
    cli.add_flag(parser, "--isolated", env="DEMO_ISOLATED", type=bool, default=False,
                 help="running in a throw-away network namespace: stop everything at the end")
    args = parser.parse_args(argv)

    model = ensure_demo_model()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = f"127.0.0.1:{args.ray_port}"
    if args.isolated:
        # A cluster owned by this process: it ends with it, and nothing else on the machine is
        # touched (`ray stop` would stop every Ray of every user of this machine).
        import ray

        ray.init(num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1",
                 include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    elif not port_open("127.0.0.1", args.ray_port):
        start_local_head(args.ray_port)
    single_gpu = load_script("ray-single-gpu.py")
    code = single_gpu.main([
        "--address", address, "--device", "cpu", "--model", str(model), "--num-replicas", "1",
        "--host", "127.0.0.1", "--port", str(args.port), "--timeout", "300"])
    if code != cli.EXIT_OK:
        return code

    url = f"http://127.0.0.1:{args.port}/"
    body = {"prompt": PROMPT, "max_tokens": 32}
    print(f"\n$ curl -X POST {url} -H 'Content-Type: application/json' "
          f"-d '{json.dumps(body, ensure_ascii=False)}'")
    started = time.perf_counter()
    answer = requests.post(url, json=body, timeout=120)
    print(json.dumps(answer.json(), ensure_ascii=False, indent=2))
    print(f"(HTTP {answer.status_code} in {(time.perf_counter() - started) * 1000:.0f} ms; the "
          "demo model has random weights, so the text is gibberish by design)")
    if args.isolated:
        print("\nThe demo ran in a loopback-only network namespace (make demo's default on "
              "shared machines), so it stops now. To keep it running and reachable at "
              f"{url}, run `make demo DEMO_ISOLATE=0`, then stop it with "
              "`.venv/bin/python stop_service.py --shutdown` and `.venv/bin/ray stop`.")
        import ray

        ray.shutdown()  # the cluster belongs to this process: it goes with it
    else:
        print(f"\nThe service keeps running at {url}.")
        print("  load test: .venv/bin/python load_test.py -c 8 -n 40 --max-tokens 32")
        print("  stop:      .venv/bin/python stop_service.py --shutdown && .venv/bin/ray stop")
    return 0 if answer.status_code == 200 else cli.EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
