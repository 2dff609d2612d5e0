"""Test-session environment, set before any test module imports Ray: no auto-connect, a Ray token
of the session's own, and the project's packages importable by the replicas the tests start."""
from __future__ import annotations

import os
import secrets
import sys
import tempfile

import pytest

# Set before ray is imported anywhere: otherwise a Serve handle's metrics thread reconnects
# after ray.shutdown() and the cluster cannot be torn down.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
# A local ray.init() turns token auth on and writes a token where Ray looks by default
# (~/.ray/auth_token, shared by everything on the machine): the tests keep theirs apart.
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    _token = os.path.join(tempfile.mkdtemp(prefix="ray-test-token-"), "auth_token")
    with open(os.open(_token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as _file:
        _file.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = _token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Ray workers (replicas) inherit this from the raylets the tests start: they must be able to
# import the project's modules and the tests' own deployments.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT, os.path.join(ROOT, "tests")] +
    [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture(scope="module")
def sim(request):
    """A simulated multi-node Ray cluster for one test module, shaped by the module's
    SIMULATED_CLUSTER (keyword arguments of _cluster_fixtures.simulated_cluster); yields
    (cluster, worker nodes)."""
    from _cluster_fixtures import simulated_cluster

    with simulated_cluster(**getattr(request.module, "SIMULATED_CLUSTER", {})) as (c, workers):
        yield c, workers
