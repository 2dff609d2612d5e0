"""Runs the test suite as N shards at once, each in its own loopback-only network namespace."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ROOT / "scripts" / "loopback.sh"
# Seconds each module takes when run alone on a 2-core machine: only their proportions matter,
# for splitting the modules into shards of about equal length. A module not listed counts as
# DEFAULT_WEIGHT_S, one that starts neither Ray nor an engine (*_unit.py) as UNIT_WEIGHT_S.
WEIGHTS_S = {
    "test_operator.py": 625, "test_reliability.py": 436, "test_openai_parity.py": 300,
    "test_declarative.py": 270, "test_topology_placement.py": 400, "test_demo.py": 190,
    "test_operations.py": 209, "test_topology_cpu.py": 146, "test_api_http.py": 144,
    "test_check_cluster.py": 71, "test_multinode_busy_placement.py": 70,
    "test_stop_service.py": 43, "test_startup_failures.py": 120,
    "test_r1_architecture.py": 60, "test_chaos.py": 330, "test_gcs_fault_tolerance.py": 120,
    "test_routing.py": 160, "test_pinned_restart.py": 130,
}
# The fault, overload and chaos modules (pytest's `reliability` mark): their own suite,
# `make test-reliability`, which CI runs after `make test` (together they are longer than
# `make test`'s time budget).
RELIABILITY = ("test_chaos.py", "test_gcs_fault_tolerance.py", "test_reliability.py",
               "test_routing.py")
SUITES = ("main", "reliability")
DEFAULT_WEIGHT_S = 30
UNIT_WEIGHT_S = 1
PROGRESS_EVERY_S = 120
PROGRESS_TAIL_BYTES = 4000


def module_weight(path: str) -> float:
    name = Path(path).name
    return WEIGHTS_S.get(name, UNIT_WEIGHT_S if name.endswith("_unit.py") else DEFAULT_WEIGHT_S)


def suite_modules(tests: Path, suite: str) -> list[Path]:
    """The test modules of a suite (see RELIABILITY)."""
    return [p for p in tests.glob("test_*.py") if (p.name in RELIABILITY) == (suite == "reliability")]


def split(files: list[str], shards: int) -> list[list[str]]:
    """Longest first, each to the shard with the least so far; within a shard in name order."""
    bins: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(shards)]
    for f in sorted(files, key=lambda f: (-module_weight(f), f)):
        index = min(range(shards), key=lambda i: bins[i][0])
        total, members = bins[index]
        bins[index] = (total + module_weight(f), members + [f])
    return [sorted(members) for _, members in bins if members]


def progress(log: Path) -> str:
    """The last percentage pytest printed in a shard's log ("[ 42%]"), or "starting"."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - PROGRESS_TAIL_BYTES))
        tail = f.read().decode(errors="replace")
    found = re.findall(r"\[\s*(\d+)%\]", tail)
    return f"{found[-1]}%" if found else "starting"


def can_isolate() -> bool:
    """Whether scripts/loopback.sh can give each shard a network namespace of its own."""
    return subprocess.run([str(LOOPBACK), "--check"], capture_output=True).returncode == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Arguments after `--` go to every shard's pytest, e.g. -- -q --durations=15.")
    parser.add_argument("--shards", type=int, default=int(os.environ.get("TEST_SHARDS", "2")),
                        help="shards run at once (env TEST_SHARDS); 1: a single pytest run")
    parser.add_argument("--tests", default=str(ROOT / "tests"), help="the tests folder")
    parser.add_argument("--suite", choices=SUITES, default="main",
                        help="without modules: main = every test_*.py but the reliability "
                             "modules; reliability = those (make test-reliability)")
    parser.add_argument("modules", nargs="*",
                        help="test modules to run (default: every test_*.py in --tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    found = [Path(m) for m in args.modules] or suite_modules(Path(args.tests), args.suite)
    if not args.modules and args.suite == "main":
        print(f"not in this suite: {', '.join(RELIABILITY)} (make test-reliability)", flush=True)
    files = sorted(str(p.resolve().relative_to(ROOT)) for p in found)
    shards = max(1, args.shards)
    if shards > 1 and not can_isolate():
        print("note: no network namespaces here (needs root or user namespaces): one shard, "
              "since shards sharing a network would take each other's ports", flush=True)
        shards = 1
    groups = split(files, shards)
    base = Path(tempfile.mkdtemp(prefix="test-shards-", dir="/tmp"))
    procs = []
    started = time.monotonic()
    for index, group in enumerate(groups):
        # Ray keeps sessions and the current cluster's address under RAY_TMPDIR (default /tmp),
        # shared by every namespace on the machine: each shard gets its own.
        tmp = base / f"shard{index}"
        tmp.mkdir()
        env = {**os.environ, "RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp)}
        if len(groups) > 1:
            env.pop("LOOPBACK_NS", None)   # a namespace of its own even inside one already
        log = open(base / f"shard{index}.log", "w")
        cmd = [str(LOOPBACK), sys.executable, "-m", "pytest", *group, *pytest_args]
        print(f"[shard {index}] {' '.join(group)}", flush=True)
        procs.append((index, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True), log))

    def stop(signum, _frame):
        for _, proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = {}
    pending = list(procs)
    next_report = time.monotonic() + PROGRESS_EVERY_S
    while pending:
        if time.monotonic() >= next_report:
            next_report += PROGRESS_EVERY_S
            print(f"[{time.monotonic() - started:.0f} s] " + ", ".join(
                f"shard {index}: {progress(base / f'shard{index}.log')}"
                for index, _, _ in pending), flush=True)
        for item in list(pending):
            index, proc, log = item
            if proc.poll() is None:
                continue
            pending.remove(item)
            log.close()
            codes[index] = proc.returncode
            print(f"\n===== shard {index}: exit {proc.returncode} after "
                  f"{time.monotonic() - started:.0f} s =====", flush=True)
            sys.stdout.write((base / f"shard{index}.log").read_text(errors="replace"))
            sys.stdout.flush()
        time.sleep(1)
    failed = sorted(i for i, code in codes.items() if code != 0)
    print(f"\n{len(groups)} shard(s) in {time.monotonic() - started:.0f} s; "
          + (f"failed: {failed}" if failed else "all passed"), flush=True)
    shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
