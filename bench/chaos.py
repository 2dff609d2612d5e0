"""Chaos run: steady mixed load on a local 2-node `ray start` cluster while faults and operations follow a schedule; per fault the failures it caused and the seconds until both nodes answer again."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from common import cli  # noqa: E402 - after the path setup above
from local_cluster import LocalCluster  # noqa: E402 - bench/ is the script's folder

EPILOG = """the run (CPU engines, the demo model, two raylets on this machine with token auth):
  1. `ray start --head` and `ray start --address` in a temp dir of their own (HOME, RAY_TMPDIR),
     ray-force-multi.py with 2 replicas of tensor parallel 1: the head hosts one, node 2 the other
     (--topology placement-group: ray-placement-group.py, a backend pinned to each node).
  2. load at --rate requests/s, cycling the guide's POST / (whole and streamed) and
     /v1/chat/completions (whole and streamed); a request is answered, failed with a clear error
     (an HTTP status with a JSON body, or an error event in its stream), hung (no byte for
     --hung-after s), cut (a stream that ended without [DONE] or an error event) or unclear
     (the connection failed without an answer).
  3. every --fault-every s (and --settle s after the previous one finished) the next fault: kill
     a replica process, kill a vLLM engine process, kill node 2's processes and start it again
     (it joins with a new node ID), a rolling redeploy with an engine change, a scale down to 1
     replica and back up; stop_service.py at the end, with the load still running.
  4. per fault: the requests sent until the next fault, how they ended, and the seconds until
     requests sent after the fault were answered by both nodes again. Requests cut or failed on a
     replica process the run killed are counted apart: nothing can answer for a killed process
     (from the kill until that process is gone: a replica whose engine was killed ends itself
     once its answers are out; a request that got no answer at all, so no node, in flight then
     is counted with it). Every request not answered is listed with its error.

run it inside a loopback-only network namespace:
  scripts/loopback.sh .venv/bin/python bench/chaos.py --minutes 10
"""

ANSWERED, CLEAR, HUNG, CUT, UNCLEAR = "answered", "clear_error", "hung", "cut", "unclear"
OUTCOMES = (ANSWERED, CLEAR, HUNG, CUT, UNCLEAR)
PLANNED = ("redeploy", "scale_down", "scale_up", "stop")
# After these, one node (or none) is meant to answer: no recovery to measure.
NO_RECOVERY = ("scale_down", "stop")
KINDS = ("root", "root_stream", "chat", "chat_stream")
APP = "chaos"


# ---------------------------------------------------------------------------------------------
# Requests and faults as data; the maths on them is pure


@dataclass
class Shot:
    """One request of the run."""

    index: int
    kind: str
    sent_at: float                # seconds since the run started
    ended_at: float = 0.0
    outcome: str = ""
    status: int = 0
    error: str | None = None
    message: str = ""
    node: str | None = None


@dataclass
class Fault:
    """One fault or operation of the schedule."""

    name: str
    started_at: float             # seconds since the run started
    ended_at: float = 0.0         # when the fault's own action finished
    acted_at: float | None = None  # when it took effect (a kill); None: when it finished
    detail: str = ""
    victim_node: str | None = None  # the node whose process the fault killed, if it killed one
    # When the killed replica process was gone: a replica whose engine was killed ends itself
    # once its requests in flight have their answers (None: at once, with the kill).
    victim_gone_at: float | None = None
    error: str | None = None      # the action itself failed (a script's non-zero exit)

    @property
    def planned(self) -> bool:
        return self.name in PLANNED

    @property
    def effective_at(self) -> float:
        return self.ended_at if self.acted_at is None else self.acted_at


def classify(ok: bool, error: str | None, status: int, stream: bool, message: str) -> str:
    """A request's outcome from loadgen's result fields."""
    if ok:
        return ANSWERED
    if error == "timeout":
        return HUNG
    if error == "stream_error" or (error or "").startswith("http_"):
        return CLEAR
    if stream and status == 200:
        # The stream started and ended without [DONE] or an error event, or the connection
        # broke in the middle of it.
        return CUT
    if error == "invalid_response" and "without 'data: [DONE]'" in message:
        return CUT
    return UNCLEAR


def recovery_s(fault: Fault, shots: list[Shot], nodes: int = 2) -> float | None:
    """Seconds from the fault taking effect until requests sent after that were answered by
    `nodes` distinct nodes (None: never within the run)."""
    at = fault.effective_at
    seen: set[str] = set()
    for shot in sorted((s for s in shots if s.sent_at >= at), key=lambda s: s.ended_at):
        if shot.outcome == ANSWERED and shot.node:
            seen.add(shot.node)
            if len(seen) >= nodes:
                return shot.ended_at - at
    return None


def on_killed_process(shot: Shot, fault: Fault) -> bool:
    """A request in flight on the node whose process the fault killed, between the kill and
    the moment that process was gone. A request that got no answer at all does not know its
    node: in flight in that window, it is counted with the killed process too (it may have
    been on either; the table still shows it as unclear)."""
    if fault.victim_node is None:
        return False
    gone = fault.victim_gone_at if fault.victim_gone_at is not None else fault.effective_at
    nodeless = shot.node is None and shot.outcome == UNCLEAR
    return ((shot.node == fault.victim_node or nodeless)
            and shot.sent_at <= gone and fault.effective_at <= shot.ended_at + 1.0)


@dataclass
class FaultRow:
    name: str
    at_s: float
    requests: int
    counts: dict[str, int]
    on_killed: int                # failures on the process the fault killed (counted apart)
    recovery_s: float | None
    planned: bool
    planned_failures: int = 0     # planned operations: requests they should not have failed
    error: str | None = None


def fault_rows(faults: list[Fault], shots: list[Shot], nodes: int = 2) -> list[FaultRow]:
    """Per fault: the requests sent from its start until the next fault's, by outcome; for the
    stop, the requests in flight when it began and those sent while it ran.

    A planned operation should fail none of its requests, except that a service being stopped
    refuses new ones: there, requests in flight when the stop began must be answered (drained)
    and later ones answered or refused with a clear error."""
    rows = []
    for fault, after in itertools.zip_longest(faults, faults[1:]):
        killed = sum(s.outcome != ANSWERED and on_killed_process(s, fault) for s in shots)
        if fault.name == "stop":
            window = [s for s in shots if s.sent_at < fault.ended_at
                      and s.ended_at > fault.started_at]
            failed = [s for s in window if s.outcome != ANSWERED
                      and (s.sent_at < fault.started_at or s.outcome != CLEAR)]
        else:
            end = after.started_at if after else float("inf")
            window = [s for s in shots if fault.started_at <= s.sent_at < end]
            failed = [s for s in window if s.outcome != ANSWERED]
        counts = {o: sum(s.outcome == o for s in window) for o in OUTCOMES}
        planned_failures = max(0, len(failed) - killed) if fault.planned else 0
        rows.append(FaultRow(fault.name, round(fault.started_at, 1), len(window), counts, killed,
                             None if fault.name in NO_RECOVERY
                             else recovery_s(fault, shots, nodes),
                             fault.planned, planned_failures, fault.error))
    return rows


@dataclass
class Verdict:
    """The run against its goal; `problems` empty when it met it."""

    requests: int
    answered_pct: float
    hung: int
    cut_elsewhere: int
    unclear: int
    failed_in_planned: int
    slowest_recovery_s: float | None
    problems: list[str] = field(default_factory=list)


def verdict(rows: list[FaultRow], shots: list[Shot], faults: list[Fault],
            answered_goal_pct: float = 99.5, recovery_goal_s: float = 60.0) -> Verdict:
    killed = {id(s) for s in shots for f in faults
              if s.outcome != ANSWERED and on_killed_process(s, f)}
    # Requests sent to a service being stopped may be refused: the share answered counts those
    # sent before the stop (its own row holds the rest to their rule).
    stop_at = next((f.started_at for f in faults if f.name == "stop"), float("inf"))
    served = [s for s in shots if s.sent_at < stop_at]
    total = len(served)
    answered = sum(s.outcome == ANSWERED for s in served)
    hung = sum(s.outcome == HUNG for s in shots)
    cut = sum(s.outcome == CUT and id(s) not in killed for s in shots)
    unclear = sum(s.outcome == UNCLEAR and id(s) not in killed for s in shots)
    planned = sum(r.planned_failures for r in rows)
    recoveries = [r.recovery_s for r in rows if r.name not in NO_RECOVERY]
    slowest = None if any(r is None for r in recoveries) else max(recoveries, default=0.0)
    pct = 100.0 * answered / total if total else 0.0
    problems = []
    if pct < answered_goal_pct:
        problems.append(f"{pct:.2f}% answered, goal {answered_goal_pct}%")
    if hung:
        problems.append(f"{hung} request(s) hung")
    if cut:
        problems.append(f"{cut} stream(s) cut away from a killed process")
    if unclear:
        problems.append(f"{unclear} request(s) failed without a clear error away from a "
                        "killed process")
    if planned:
        problems.append(f"{planned} request(s) failed during planned operations")
    if any(r is None for r in recoveries):
        problems.append("both nodes never answered again after: " + ", ".join(
            r.name for r in rows if r.name not in NO_RECOVERY and r.recovery_s is None))
    elif slowest is not None and slowest > recovery_goal_s:
        problems.append(f"slowest recovery {slowest:.0f} s, goal {recovery_goal_s:.0f} s")
    problems += [f"{r.name} at {r.at_s:.0f} s: {r.error}" for r in rows if r.error]
    return Verdict(total, round(pct, 3), hung, cut, unclear, planned, slowest, problems)


def failure_lines(shots: list[Shot], faults: list[Fault], limit: int = 30) -> list[str]:
    """One line per request that was not answered, oldest first (at most `limit`), with the
    fault it fell under: what an operator reads to tell a dying replica's 503 from a dropped
    connection."""
    stop_at = next((f.started_at for f in faults if f.name == "stop"), float("inf"))
    # A service being stopped may refuse new requests with a clear error: not listed.
    failed = sorted((s for s in shots if s.outcome != ANSWERED
                     and not (s.outcome == CLEAR and s.sent_at >= stop_at)),
                    key=lambda s: s.sent_at)
    lines = []
    for s in failed[:limit]:
        under = next((f.name for f in reversed(faults) if f.started_at <= s.sent_at), "-")
        killed = any(on_killed_process(s, f) for f in faults)
        lines.append(f"- {s.sent_at:7.1f} s +{s.ended_at - s.sent_at:5.1f} s {s.kind:<11} "
                     f"{s.outcome}{' (killed process)' if killed else ''} under {under}: "
                     f"{s.error or '-'} status {s.status} node {s.node or '-'}: "
                     f"{(s.message or '').replace(chr(10), ' ')[:160]}")
    if len(failed) > limit:
        lines.append(f"- ... and {len(failed) - limit} more (all in --json)")
    return lines


def markdown(rows: list[FaultRow], result: Verdict,
             failures: list[str] | None = None) -> str:
    lines = ["| fault | at (s) | requests | answered | clear error | hung | cut | unclear | "
             "on the killed process | both nodes again after (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recovery = "-" if r.name in NO_RECOVERY else ("never" if r.recovery_s is None
                                                 else f"{r.recovery_s:.0f}")
        name = r.name + (" (planned)" if r.planned else "")
        c = r.counts
        lines.append(f"| {name} | {r.at_s:.0f} | {r.requests} | {c[ANSWERED]} | {c[CLEAR]} | "
                     f"{c[HUNG]} | {c[CUT]} | {c[UNCLEAR]} | {r.on_killed} | {recovery} |")
    lines.append("")
    lines.append(f"{result.requests} requests before the stop, {result.answered_pct:.2f}% answered, "
                 f"{result.hung} hung, {result.cut_elsewhere} cut and {result.unclear} unclear "
                 f"away from killed processes, {result.failed_in_planned} failed during planned "
                 f"operations, slowest recovery "
                 + ("never" if result.slowest_recovery_s is None
                    else f"{result.slowest_recovery_s:.0f} s") + ".")
    lines.append("goal met" if not result.problems else "goal missed: " + "; ".join(
        result.problems))
    if failures:
        lines += ["", "requests not answered (sent at, took, kind, outcome, fault, error):",
                  *failures]
    return "\n".join(lines) + "\n"


# The faults of each topology, in the order they cycle. The placement-group script runs one
# backend per node: it has no replica count to scale.
CYCLES = {"force-multi": ["kill_replica", "kill_engine", "restart_node", "redeploy",
                          "scale_down", "scale_up"],
          "placement-group": ["kill_replica", "kill_engine", "restart_node", "redeploy"]}
SCRIPTS = {"force-multi": ("ray-force-multi.py", ["--num-replicas", "2"]),
           "placement-group": ("ray-placement-group.py", ["--num-backends", "2"])}
SECOND_NODE_IP = "127.0.0.2"


def schedule(minutes: float, every_s: float, first_s: float,
             topology: str = "force-multi") -> list[tuple[float, str]]:
    """(seconds since the start, fault) for the run; the cycle repeats, stop comes last."""
    cycle = CYCLES[topology]
    end = minutes * 60
    out, at = [], first_s
    for name in itertools.cycle(cycle):
        if at >= end - every_s / 2:
            break
        out.append((at, name))
        at += every_s
    out.append((max(end, at), "stop"))
    return out


# ---------------------------------------------------------------------------------------------
# The cluster: two raylets of this machine, ended by their own processes


# ---------------------------------------------------------------------------------------------
# Faults


def head_node(report: dict) -> str:
    """The head's node ID in a check_cluster.py --json report."""
    return next(n["node_id"] for n in report["nodes"] if n["is_head"])


class Faults:
    """The schedule's actions on the cluster (blocking: they run in a thread); each reads the
    cluster once, through check_cluster.py --json as an operator would."""

    def __init__(self, cluster: LocalCluster, deploy_args: list[str], topology: str):
        self.cluster = cluster
        self.started = time.monotonic()  # the run's start, set when the load starts
        self.script, self.shape = SCRIPTS[topology]
        self.deploy_args = deploy_args
        self.redeploys = 0

    def clock(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def _victim(self, on_head: bool) -> dict:
        """A RUNNING engine replica of the app, on the head or not where there is a choice."""
        from replica.server import ROUTER_DEPLOYMENT

        report = self.cluster.report(APP)
        replicas = [r for r in report.get("replicas", [])
                    if r.get("app") == APP and r.get("state") == "RUNNING" and r.get("pid")
                    and r.get("deployment") != ROUTER_DEPLOYMENT]
        if not replicas:
            raise RuntimeError("no RUNNING replica to act on")
        head = head_node(report)
        preferred = [r for r in replicas if (r["node_id"] == head) == on_head]
        return (preferred or replicas)[0]

    def kill_replica(self, fault: Fault, count: int) -> None:
        import psutil

        victim = self._victim(on_head=count % 2 == 1)
        psutil.Process(victim["pid"]).kill()
        fault.acted_at = self.clock()
        fault.victim_node = victim["node_id"]
        fault.detail = f"SIGKILL replica {victim['replica_id']} (pid {victim['pid']})"

    def kill_engine(self, fault: Fault, count: int) -> None:
        import psutil

        victim = self._victim(on_head=count % 2 == 0)
        children = psutil.Process(victim["pid"]).children(recursive=True)
        if not children:
            raise RuntimeError(f"replica {victim['replica_id']} has no engine process")
        replica = psutil.Process(victim["pid"])
        for child in children:
            child.kill()
        fault.acted_at = self.clock()
        fault.victim_node = victim["node_id"]
        with contextlib.suppress(psutil.Error):
            replica.wait(timeout=120)  # it ends itself once its answers are out
        fault.victim_gone_at = self.clock()
        fault.detail = (f"SIGKILL the engine process(es) {[c.pid for c in children]} of "
                        f"replica {victim['replica_id']}")

    def restart_node(self, fault: Fault, down_s: float = 10.0) -> None:
        import psutil

        from common.demo import node_processes

        report = self.cluster.report(APP)
        head = head_node(report)
        node = next(n["node_id"] for n in report["nodes"] if n["alive"] and n["node_id"] != head)
        procs = node_processes(node)
        if not procs:
            raise RuntimeError(f"no process of node {node} found")
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        fault.acted_at = self.clock()
        fault.victim_node = node
        time.sleep(down_s)
        self.cluster.start_second_node()
        fault.detail = f"SIGKILL {len(procs)} processes of node {node[:12]}, started again"

    def deploy(self, *extra: str) -> None:
        self.cluster.script(self.script, *self.deploy_args, *extra)

    def _engine_flags(self) -> list[str]:
        """The engine setting the redeploys alternate (none before the first): a scale keeps
        the current one, so that it stays a change of replicas only."""
        if not self.redeploys:
            return []
        return ["--max-num-seqs", "32" if self.redeploys % 2 else "64"]

    def redeploy(self, fault: Fault) -> None:
        # An engine setting change: Serve replaces the replicas one by one.
        self.redeploys += 1
        self.deploy(*self.shape, *self._engine_flags())
        fault.detail = "rolling restart: " + " ".join(self._engine_flags())

    def scale(self, fault: Fault, replicas: int) -> None:
        self.deploy("--num-replicas", str(replicas), *self._engine_flags())
        fault.detail = f"--num-replicas {replicas}"

    def stop(self, fault: Fault) -> None:
        self.cluster.script("stop_service.py", "--app", APP)
        fault.detail = "stop_service.py --app " + APP


# ---------------------------------------------------------------------------------------------
# Load


def payload(kind: str, max_tokens: int, model: str) -> tuple[str, dict]:
    prompt = "请简要介绍人工智能的发展历史"
    if kind.startswith("root"):
        return "/", {"prompt": prompt, "max_tokens": max_tokens,
                     "stream": kind.endswith("stream")}
    return "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "stream": kind.endswith("stream")}


async def load(url: str, rate: float, max_tokens: int, stream_max_tokens: int,
               hung_after_s: float, model: str, started: float, stop: threading.Event,
               shots: list[Shot], results: list | None = None) -> None:
    """Requests at `rate` per second until `stop`, each recorded in `shots` when it ends (and
    loadgen's own record of it in `results`, for the HTML report)."""
    import aiohttp

    from loadgen.client import send_request

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=hung_after_s,
                                    sock_read=hung_after_s)
    pending: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for index in itertools.count():
            if stop.is_set():
                break
            kind = KINDS[index % len(KINDS)]
            path, body = payload(kind, stream_max_tokens if kind.endswith("stream")
                                 else max_tokens, model)
            shot = Shot(index, kind, time.monotonic() - started)

            async def one(shot: Shot = shot, path: str = path, body: dict = body) -> None:
                stream = bool(body["stream"])
                result = await send_request(session, url + path, json.dumps(body).encode(),
                                            {"Content-Type": "application/json"}, stream,
                                            shot.index, started)
                shot.ended_at = time.monotonic() - started
                shot.status, shot.error, shot.node = result.status, result.error, result.node
                shot.message = result.message[:300]
                shot.outcome = classify(result.ok, result.error, result.status, stream,
                                        result.message)
                shots.append(shot)
                if results is not None:
                    results.append(result)

            task = asyncio.get_running_loop().create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1.0 / rate)
        if pending:
            await asyncio.wait(pending)


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> int:
    from common.demo_model import ensure_demo_model

    model = str(ensure_demo_model(quiet=True))
    base = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    cluster = LocalCluster(base, args.cpus_per_node,
                           SECOND_NODE_IP if args.topology == "placement-group" else "127.0.0.1")
    deploy_args = ["--device", "cpu", "--model", model, "--max-model-len", "512",
                   "--tensor-parallel-size", "1", "--host", "127.0.0.1",
                   "--port", str(cluster.http_port), "--proxy-location", "HeadOnly",
                   "--app-name", APP, "--timeout", "600"]
    faults = Faults(cluster, deploy_args, args.topology)
    try:
        say(f"cluster in {base}: starting two raylets")
        cluster.start()
        say(f"deploying {faults.script} {' '.join(faults.shape)}")
        faults.deploy(*faults.shape)
        shots, results, done, wall_started = _run_with_load(cluster, faults, args)
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = fault_rows(done, shots)
    result = verdict(rows, shots, done, args.answered_goal, args.recovery_goal)
    table = markdown(rows, result, failure_lines(shots, done))
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "faults": [asdict(f) for f in done],
            "rows": [asdict(r) for r in rows], "verdict": asdict(result),
            "shots": [asdict(s) for s in shots]}, indent=1))
        say(f"wrote {args.json}")
    if args.report:
        write_html_report(args.report, cluster.url, args, results, done, wall_started, table)
        say(f"wrote {args.report}")
    return cli.EXIT_OK if not result.problems else cli.EXIT_UNHEALTHY


def write_html_report(path: str, url: str, args: argparse.Namespace, results: list,
                      faults: list[Fault], wall_started: float, table: str) -> None:
    """load_test.py --report's page over the whole run, each fault marked on its time axes."""
    from loadgen.client import LoadConfig, LoadResult, summarize
    from loadgen.report import Marker, build_report_data
    from loadgen.report_html import write_report

    config = LoadConfig(url=url, num_requests=0, request_rate=args.rate,
                        duration=args.minutes * 60, max_tokens=args.max_tokens,
                        timeout=args.hung_after, expected_nodes=2)
    duration = max((r.start + r.latency for r in results), default=0.0)
    load = LoadResult(config, results, duration, wall_started)
    markers = [Marker(f.effective_at if not f.planned else f.started_at, f.name) for f in faults]
    data = build_report_data(load, summarize(load), markers,
                             title=f"Chaos run against {url} ({args.topology}): "
                                   f"{', '.join(KINDS)} in turn at {args.rate:g} requests/s")
    write_report(path, data, table)


def _run_with_load(cluster: LocalCluster, faults: Faults, args: argparse.Namespace
                   ) -> tuple[list[Shot], list, list[Fault], float]:
    shots: list[Shot] = []
    results: list = []
    done: list[Fault] = []
    plan = schedule(args.minutes, args.fault_every, args.first_fault, args.topology)
    wall_started = time.time()
    started = time.monotonic()
    faults.started = started
    stop_load = threading.Event()

    async def main() -> None:
        runner = asyncio.get_running_loop().create_task(
            load(cluster.url, args.rate, args.max_tokens, args.stream_max_tokens,
                 args.hung_after, "DeepSeek-R1", started, stop_load, shots, results))
        await asyncio.to_thread(_faults_on_schedule, faults, plan, started, done, args.settle)
        stop_load.set()
        await runner

    asyncio.run(main())
    return shots, results, done, wall_started


def _faults_on_schedule(faults: Faults, plan: list[tuple[float, str]], started: float,
                        done: list[Fault], settle_s: float) -> None:
    counts: dict[str, int] = {}
    actions: dict[str, Callable[[Fault, int], None]] = {
        "kill_replica": faults.kill_replica, "kill_engine": faults.kill_engine,
        "restart_node": lambda f, n: faults.restart_node(f),
        "redeploy": lambda f, n: faults.redeploy(f),
        "scale_down": lambda f, n: faults.scale(f, 1),
        "scale_up": lambda f, n: faults.scale(f, 2),
        "stop": lambda f, n: faults.stop(f)}
    shift = 0.0  # how far an operation that outlasted its slot pushed the schedule back
    for at, name in plan:
        previous_end = done[-1].ended_at if done else 0.0
        # Each fault gets --settle seconds of load after its action finished before the next.
        shift = max(shift, previous_end + settle_s - at)
        wait = at + shift - (time.monotonic() - started)
        if wait > 0:
            time.sleep(wait)
        count = counts[name] = counts.get(name, 0) + 1
        fault = Fault(name, time.monotonic() - started)
        say(f"[{fault.started_at:5.0f} s] {name}")
        try:
            actions[name](fault, count)
        except Exception as exc:  # noqa: BLE001 - a failed action is a result of the run
            fault.error = f"{type(exc).__name__}: {str(exc)[-500:]}"
            say(f"  failed: {fault.error}")
        fault.ended_at = time.monotonic() - started
        if fault.detail:
            say(f"  {fault.detail} ({fault.ended_at - fault.started_at:.0f} s)")
        done.append(fault)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# The run's numeric settings: flag, type, default, help.
_NUMBER_FLAGS: tuple[tuple[str, type, float, str], ...] = (
    ("--minutes", float, 10.0, "length of the run"),
    ("--fault-every", float, 60.0, "seconds between faults"),
    ("--first-fault", float, 30.0, "seconds of load before the first fault"),
    ("--rate", float, 2.0, "requests per second"),
    ("--max-tokens", int, 16, "max_tokens of each whole (not streamed) request"),
    ("--stream-max-tokens", int, 64, "max_tokens of each streamed request: longer, so that "
                                     "faults and operations meet open streams"),
    ("--settle", float, 20.0, "seconds of load after a fault's action finished before the "
                              "next fault; a slow operation pushes the schedule back"),
    ("--hung-after", float, 30.0, "seconds without a byte after which a request counts as hung"),
    ("--cpus-per-node", int, 2, "logical CPUs each raylet offers"),
    ("--answered-goal", float, 99.5, "percent of requests that must be answered"),
    ("--recovery-goal", float, 60.0, "seconds within which both nodes must answer again after "
                                     "each fault"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", choices=sorted(SCRIPTS), default="force-multi",
                        help="what runs: ray-force-multi.py with 2 replicas, or "
                             "ray-placement-group.py with a backend pinned to each node (node 2 "
                             f"then on {SECOND_NODE_IP}, an IP of its own) (default: "
                             "%(default)s)")
    for flag, kind, default, text in _NUMBER_FLAGS:
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write every request and fault here")
    parser.add_argument("--report", default=None, metavar="HTML",
                        help="also write load_test.py --report's HTML page over the whole run, "
                             "each fault marked on its time axes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the cluster's temp dir (logs) after the run")
    return parser


@cli.exits_with_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(cli.EXIT_UNHEALTHY))
    sys.exit(main())
