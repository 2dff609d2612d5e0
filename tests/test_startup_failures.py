"""A replica whose engine cannot start: the deploy and check_cluster.py say why, from the engine's own log, with the remedy."""
from __future__ import annotations

import json

import pytest
import ray

import check_cluster
from _serve_fixtures import cpu_args, deploy_script, free_port, local_ray
from common import cli

KV_BYTES = 2**20   # a 1 MiB KV cache cannot hold one 2048-token sequence of the demo model


@pytest.fixture(scope="module")
def cluster_with_dashboard():
    with local_ray(num_cpus=2, dashboard=True):
        yield ray.get_runtime_context().gcs_address


def test_a_kv_cache_too_small_fails_the_deploy_with_the_engines_cause(cluster_with_dashboard,
                                                                       capsys):
    code = deploy_script("ray-single-gpu.py", *cpu_args(
        free_port(), "--address", cluster_with_dashboard, "--num-replicas", "1",
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(KV_BYTES),
        "--app-name", "toosmall", "--route-prefix", "/toosmall"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE
    assert "application 'toosmall' is DEPLOY_FAILED" in err
    assert "why the replicas did not start (from their logs):" in err
    assert "ValueError: To serve at least one request with the model's max seq len (2048)" in err
    assert "remedy: --max-model-len" in err
    assert f"remedy: --kv-cache-memory-bytes larger than {KV_BYTES}" in err
    # Serve's own traceback is cut to its first and last line.
    assert "initialize_and_get_metadata" not in err

    assert check_cluster.main(["--address", cluster_with_dashboard, "--app", "toosmall"]) \
        == cli.EXIT_UNHEALTHY
    out = capsys.readouterr().out
    assert "ValueError: To serve at least one request" in out and "remedy: --max-model-len" in out
    assert check_cluster.main(["--address", cluster_with_dashboard, "--app", "toosmall",
                               "--json"]) == cli.EXIT_UNHEALTHY
    data = json.loads(capsys.readouterr().out)
    [first, *_] = data["start_failures"]["toosmall"]
    assert first["cause"].startswith("ValueError: To serve at least one request")
