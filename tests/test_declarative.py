"""The declarative path on a real `ray start` cluster (two raylets, token auth): a script's
--print-config applied with `serve deploy` runs what the script runs, a second apply changes
nothing, a lightweight change keeps the replicas and an engine change replaces them."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from _serve_fixtures import clean_env, wait_until
from common.cli import EXIT_UNHEALTHY
from common.deploy_options import controller_env
from test_operator import (PY, Operator, assert_both_nodes, cluster_nodes, running_cluster,
                           running_replicas)

SERVE = str(Path(PY).parent / "serve")


class DeclarativeOperator(Operator):
    """An operator whose `ray start` carries Serve's controller settings (the README's cluster
    section for `serve deploy`), with the dashboard address `serve deploy` talks to."""

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(self.home, self.base, **{**controller_env("haproxy"), **extra})

    def config(self, *args: str) -> Path:
        out = self.script("ray-force-multi.py", "--print-config", "--device", "cpu",
                          "--model", self.model, "--max-model-len", "512",
                          "--host", "127.0.0.1", "--port", str(self.http_port),
                          "--proxy-location", "HeadOnly", "--app-name", "decl",
                          "--num-replicas", "2", "--tensor-parallel-size", "1", *args).stdout
        path = self.base / f"config-{len(list(self.base.glob('config-*')))}.yaml"
        path.write_text(out)
        return path

    def serve(self, *args: str):
        """The `serve` CLI against the dashboard (it sends the token only when told auth is on)."""
        return self.run(SERVE, *args, "-a", self.dashboard, env=self.env(RAY_AUTH_MODE="token"))

    def serve_deploy(self, config: Path) -> None:
        self.serve("deploy", str(config))

    def app_status(self) -> dict:
        out = self.serve("status").stdout
        return (yaml.safe_load(out) or {}).get("applications", {}).get("decl", {})

    def serve_running(self, replicas: int) -> bool:
        """`serve status` says the app runs `replicas` healthy replicas."""
        status = self.app_status()
        deployments = status.get("deployments", {})
        return status.get("status") == "RUNNING" and all(
            d.get("status") == "HEALTHY" for d in deployments.values()) and sum(
            d.get("replica_states", {}).get("RUNNING", 0) for d in deployments.values()
        ) == replicas

    def wait_running(self, replicas: int = 2, replaced: set[str] = frozenset()) -> list[dict]:
        """The app's running replicas once `serve status` says it runs `replicas` of them and
        none is in `replaced`."""
        found: list[dict] = []

        def running() -> bool:
            # check_cluster.py (the replica IDs) only once `serve status` agrees: each poll's CLIs
            # cost seconds of CPU on the 2 cores the engines start on.
            if not self.serve_running(replicas):
                return False
            found[:] = running_replicas(self, "decl")
            ids = {r["replica_id"] for r in found}
            return len(found) == replicas and not ids & replaced

        try:
            wait_until(running, timeout=600, interval=10, what="the applied config RUNNING")
        except AssertionError:
            self.print_serve_logs()
            raise
        return found


@pytest.fixture(scope="module")
def declarative():
    with running_cluster(DeclarativeOperator, "decl-") as op:
        yield op


def test_serve_deploy_of_the_printed_config(declarative):
    op = declarative
    first = op.config()
    applied = yaml.safe_load(first.read_text())
    assert applied["applications"][0]["import_path"] == "common.builders:force_multi"
    # The scripts' pre-deploy checks, for the file: it fits; three one-per-node replicas do not.
    plan = op.script("check_cluster.py", "--address", op.address, "--plan", str(first))
    assert "ready for `serve deploy`" in plan.stdout
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in plan.stderr
    op.script("check_cluster.py", "--address", op.address, "--plan",
              str(op.config("--num-replicas", "3")), check_code=EXIT_UNHEALTHY)
    op.serve_deploy(first)
    replicas = op.wait_running()
    nodes, head = cluster_nodes(op.report("--address", op.address))
    assert {r["node_id"] for r in replicas} == nodes and len(nodes) == 2
    assert head in {r["node_id"] for r in replicas}
    answer = op.curl()
    assert answer["object"] == "text_completion" and answer["node"] in nodes
    assert_both_nodes(op, op.load_test(), nodes)
    ids = {r["replica_id"] for r in replicas}

    # The same file again: Serve sees no change.
    op.serve_deploy(first)
    assert {r["replica_id"] for r in op.wait_running()} == ids

    # A lightweight option: updated on the running replicas.
    lighter = op.config("--max-ongoing-requests", "100")
    op.serve_deploy(lighter)
    wait_until(lambda: "max_ongoing_requests: 100" in op.serve("config").stdout, timeout=60,
               interval=2, what="the new config stored")
    assert {r["replica_id"] for r in op.wait_running()} == ids

    # An engine setting (on GPUs: --tensor-parallel-size; CPU engines run TP=1): replaced.
    changed = op.config("--max-ongoing-requests", "100", "--max-model-len", "384")
    op.serve_deploy(changed)
    op.wait_running(replaced=ids)
    assert_both_nodes(op, op.load_test(), nodes)
