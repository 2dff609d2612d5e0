"""Unit tests: the tested (Ray, vLLM) pairs, the deploy's refusal of others, and the Ray seam's checks."""
from __future__ import annotations

import importlib

import pytest

from common import cli, layout
from replica import ray_compat, versions


def test_the_installed_pair_is_a_tested_one():
    installed = layout.installed_versions()
    assert versions.is_tested(installed["ray"], installed["vllm"]), installed


def test_a_local_build_tag_does_not_matter_and_other_releases_are_untested():
    assert versions.is_tested("2.60.0", "0.32.0+cpu") and versions.is_tested("2.60.0", "0.26.0")
    assert not versions.is_tested("2.60.0", "0.34.0") and not versions.is_tested("2.61.0", "0.32.0")


def test_an_untested_pair_is_refused_with_the_tested_ones_named():
    with pytest.raises(cli.ScriptError) as refused:
        layout.check_tested_versions([("GPU node 10.0.0.2", {"ray": "2.60.0", "vllm": "0.34.0"})],
                                     allow_untested=False)
    message = str(refused.value)
    assert "Ray 2.60.0 + vLLM 0.34.0 on GPU node 10.0.0.2" in message
    assert "Ray 2.60.0 + vLLM 0.32.0" in message and "--allow-untested-versions" in message
    assert refused.value.code == cli.EXIT_UNHEALTHY


def test_the_override_deploys_with_a_warning(capsys):
    layout.check_tested_versions([("this machine", {"ray": "2.60.0", "vllm": "0.34.0"})],
                                 allow_untested=True)
    assert "warning: Ray 2.60.0 + vLLM 0.34.0 on this machine" in capsys.readouterr().err


def test_a_node_without_vllm_is_refused():
    with pytest.raises(cli.ScriptError, match="vLLM is not installed on GPU node b"):
        layout.check_tested_versions([("GPU node b", {"ray": "2.60.0", "vllm": None})], True)


# ---- the Ray seam ---------------------------------------------------------------------------


def test_the_installed_ray_has_every_internal_the_seam_needs():
    assert ray_compat.check() == []


@pytest.mark.parametrize("module, name", ray_compat._SYMBOLS)
def test_a_missing_ray_internal_is_named_with_the_versions(monkeypatch, module, name):
    monkeypatch.delattr(importlib.import_module(module), name)
    problems = ray_compat.check()
    assert len(problems) == 1
    assert f"{module}.{name}" in problems[0] and ray_compat.ray_version() in problems[0]
    assert "tested pairs: Ray 2.60.0 + vLLM" in problems[0]


def test_the_deploy_refuses_a_ray_without_an_internal(monkeypatch):
    from common import deploy

    monkeypatch.delattr(importlib.import_module("ray._private.state"), "actors")
    with pytest.raises(cli.ScriptError, match="ray._private.state.actors"):
        deploy.check_upstreams(allow_untested=False)


def test_a_ray_refusing_the_version_keyword_is_an_error_not_a_silent_restart():
    class Refusing:
        def options(self, **kwargs):
            raise TypeError("unexpected keyword argument '_internal'")

    with pytest.raises(ray_compat.RayIncompatible, match="_internal=True"):
        ray_compat.with_version(Refusing(), "v1")


def test_the_version_keyword_reaches_the_deployment():
    from ray import serve

    @serve.deployment
    class Versioned:
        pass

    assert ray_compat.with_version(Versioned, "abc").version == "abc"


def test_a_replica_on_an_untested_pair_warns_at_every_start(caplog):
    import logging

    from replica.server import warn_if_untested

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        warn_if_untested("2.60.0", "0.32.0+cpu", "a" * 56)
        assert not caplog.records
        warn_if_untested("2.60.0", "0.34.0", "a" * 56)
    [record] = caplog.records
    assert "Ray 2.60.0 + vLLM 0.34.0 on node aaaaaaaaaaaa is not a pair" in record.getMessage()
    assert "--allow-untested-versions" in record.getMessage()
