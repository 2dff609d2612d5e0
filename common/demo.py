"""`make demo`: a small real instruct model on the CPU build behind Ray Serve, left running on 127.0.0.1."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from common import cli
from common.ray_connect import split_host_port
from replica import ray_compat

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".cache" / "demo"
PROMPT = "Briefly explain what a GPU is."
MAX_TOKENS = 48
APP_NAME = "demo"
DEFAULT_HTTP_PORT = 8000
DEFAULT_RAY_PORT = 6379


def load_script(name: str):
    """Import a top-level script (hyphenated or extensionless names) as a module."""
    path = ROOT / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_").replace(".py", ""),
                                                  str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    if spec is None:  # never, with a file loader given; module_from_spec needs a spec
        raise ImportError(f"cannot load {path}")
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


def live_cluster() -> str | None:
    """The address of a running Ray cluster this machine points at (RAY_ADDRESS, else the one
    `ray start` recorded last), if something answers there. A recorded address whose processes
    were killed is ignored rather than taken for a cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    recorded = ray_compat.recorded_cluster_address()
    target = split_host_port(recorded) if recorded else None
    return recorded if target and port_open(*target) else None


def start_local_head(port: int) -> None:
    """A one-node Ray cluster on 127.0.0.1 (all of this machine's CPUs), left running."""
    if port_open("127.0.0.1", port):
        raise cli.ScriptError(f"port {port} is taken by something that is not a Ray cluster "
                        "recorded on this machine; pass --ray-port")
    cmd = [ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--num-cpus={max(2, os.cpu_count() or 2)}",
           "--disable-usage-stats"]
    print("starting a local Ray head:", " ".join(["ray", *cmd[1:]]), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise cli.ScriptError(f"`ray start --head` failed: {done.stderr.strip()[-600:]}")


def state_file(http_port: int) -> Path:
    return STATE_DIR / f"{http_port}.json"


def service_answers(http_port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def python_cmd(*args: str) -> str:
    """How to run one of the project's scripts from the repo root, as printed for the user."""
    exe = os.path.relpath(sys.executable, ROOT) if str(sys.executable).startswith(str(ROOT)) \
        else sys.executable
    return " ".join([exe, *(shlex.quote(a) for a in args)])


def stop_command(http_port: int) -> str:
    return "make demo-stop" if http_port == DEFAULT_HTTP_PORT else \
        python_cmd("-m", "common.demo", "--stop", "--port", str(http_port))


def session_dir_of_driver() -> str | None:
    """The Ray session directory of the cluster this process is connected to."""
    return ray_compat.session_dir()


def deploy(model: Path, address: str, http_port: int) -> None:
    single_gpu = load_script("ray-single-gpu.py")
    code = single_gpu.main([
        "--address", address, "--device", "cpu", "--model", str(model), "--num-replicas", "1",
        "--app-name", APP_NAME, "--host", "127.0.0.1", "--port", str(http_port),
        # The CPU build's KV cache (128 MiB of float32) holds about 2,900 tokens of this model; SmolLM2 is
        # no reasoning model, whatever name it is served under.
        "--max-model-len", "2048", "--reasoning-parser", "none", "--timeout", "600"])
    if code != cli.EXIT_OK:
        raise cli.ScriptError("deploying the demo failed (see above)", code)


def show_answer(http_port: int) -> None:
    url = f"http://127.0.0.1:{http_port}/"
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": MAX_TOKENS}
    print(f"\n$ curl -X POST {url} -H 'Content-Type: application/json' "
          f"-d '{json.dumps(body, ensure_ascii=False)}'")
    started = time.perf_counter()
    answer = requests.post(url, json=body, timeout=300)
    print(json.dumps(answer.json(), ensure_ascii=False, indent=2))
    print(f"(HTTP {answer.status_code} in {(time.perf_counter() - started) * 1000:.0f} ms)")
    if answer.status_code != 200:
        raise cli.ScriptError(f"the demo answered HTTP {answer.status_code}")


def print_next_steps(http_port: int, address: str) -> None:
    url = f"http://127.0.0.1:{http_port}"
    body = json.dumps({"prompt": "What is the capital of France?", "max_tokens": 32})
    chat = json.dumps({"model": "DeepSeek-R1", "max_tokens": 32, "temperature": 0, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]})
    print(f"\nThe demo keeps running at {url}/ until you stop it. Try:")
    print(f"  curl -X POST {url}/ -H 'Content-Type: application/json' -d '{body}'")
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'")
    # A CPU engine shares one step's time across its batch: a short run ends in seconds.
    print(f"  {python_cmd('load_test.py', '-c', '4', '-n', '8', '--max-tokens', '16', '--url', url)}")
    print(f"  {python_cmd('check_cluster.py', '--address', address)}")
    print(f"stop the demo: {stop_command(http_port)}")


def run_demo(args) -> None:
    from common.demo_model import ensure_instruct_model

    model = ensure_instruct_model(quiet=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    state_path = state_file(args.port)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    address = live_cluster()
    if address:
        print(f"using the running Ray cluster at {address}", flush=True)
    else:
        start_local_head(args.ray_port)
        address = f"127.0.0.1:{args.ray_port}"
        state = {"address": address, "started_head": True}
    if service_answers(args.port):
        print(f"a service already answers on 127.0.0.1:{args.port}: reusing it", flush=True)
    else:
        print(f"model: {model} (SmolLM2-135M-Instruct, served as DeepSeek-R1 so that the guide's "
              "commands work unchanged)", flush=True)
        deploy(model, address, args.port)
        if state.get("started_head") and not state.get("session_dir"):
            state["session_dir"] = session_dir_of_driver()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state.setdefault("address", address)
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    show_answer(args.port)
    print_next_steps(args.port, address)


def stop_demo(args) -> None:
    """Delete the demo app and shut Serve down; end the Ray head only if the demo started it."""
    path = state_file(args.port)
    state = json.loads(path.read_text()) if path.is_file() else {}
    address = state.get("address") or live_cluster()
    target = split_host_port(address) if address else None
    if target and port_open(*target):
        # Serve itself goes only with a cluster the demo started: elsewhere it may serve others.
        shutdown = ["--shutdown"] if state.get("started_head") else []
        code = load_script("stop_service.py").main(["--address", address, "--app", APP_NAME,
                                                     *shutdown])
        if code != cli.EXIT_OK:
            raise cli.ScriptError("stopping the demo application failed (see above)", code)
    else:
        print("no running Ray cluster found for the demo")
    if state.get("started_head") and state.get("session_dir"):
        ended = end_processes_of_session(state["session_dir"])
        print(f"stopped the demo's Ray head ({ended} processes)")
    elif address:
        print(f"left the Ray cluster at {address} running (the demo did not start it)")
    path.unlink(missing_ok=True)


NODE_ID_FLAG = "--node-id="
# The raylet spells it with an underscore.
RAYLET_NODE_ID_FLAG = "--node_id="


def _with_children(named: set) -> list:
    """`named` processes and all their children (workers rename themselves, so they are found
    as children, and so are the processes they start, such as Serve's HAProxy)."""
    import psutil

    found: dict[int, psutil.Process] = {proc.pid: proc for proc in named}
    for proc in named:
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _command_lines() -> dict:
    import psutil

    return {proc: proc.info["cmdline"] or [] for proc in psutil.process_iter(["cmdline"])
            if proc.pid != os.getpid()}


def session_processes(session_dir: str) -> list:
    """This machine's processes of one Ray session, and their children: Ray's daemons name the
    session directory on their command line, except Ray's client server (port 10001), which
    names only its node's ID (`--node-id=`, which the others carry too)."""
    commands = _command_lines()
    named = {proc for proc, cmdline in commands.items()
             if any(session_dir in part for part in cmdline)}
    node_flags = {part for proc in named for part in commands[proc]
                  if part.startswith(NODE_ID_FLAG)}
    named |= {proc for proc, cmdline in commands.items() if node_flags & set(cmdline)}
    return _with_children(named)


def node_processes(node_id: str) -> list:
    """The processes of one Ray node of this machine (its raylet and daemons name its ID), and
    their children: what a machine that dies takes with it."""
    flags = {f"{NODE_ID_FLAG}{node_id}", f"{RAYLET_NODE_ID_FLAG}{node_id}"}
    return _with_children({proc for proc, cmdline in _command_lines().items()
                           if flags & set(cmdline)})


def end_processes(procs: list, grace_s: float = 10.0) -> int:
    """SIGTERM those of `procs` still running, SIGKILL what is left after `grace_s`."""
    import psutil

    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)


def end_processes_of_session(session_dir: str, grace_s: float = 10.0) -> int:
    """Terminate one Ray session's processes and their children; `ray stop` would end every Ray
    cluster on the machine instead."""
    return end_processes(session_processes(session_dir), grace_s)


@cli.exits_with_codes
def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--ray-port", env="DEMO_RAY_PORT", type=int, default=DEFAULT_RAY_PORT,
                 help="GCS port of the local Ray head the demo starts when none is running")
    cli.add_flag(parser, "--port", env="PORT", type=int, default=DEFAULT_HTTP_PORT,
                 help="HTTP port of the demo service")
    parser.add_argument("--stop", action="store_true",
                        help="stop the demo (and the Ray head, if the demo started it)")
    args = parser.parse_args(argv)
    (stop_demo if args.stop else run_demo)(args)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
