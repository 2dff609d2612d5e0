"""Unit tests: flags with env fallbacks, engine kwargs per device, replica resources, replica counts."""
from __future__ import annotations

import pytest

from common import cli, replica_plan
from common.options import (add_engine_args, add_serve_args, engine_config_from_args,
                            serve_config_from_args)
from replica.config import EngineConfig, ServeConfig, replica_env
from common.deploy_options import deployment_options, replica_resources


def parse(argv, env=None, monkeypatch=None):
    for key, value in (env or {}).items():
        monkeypatch.setenv(cli.env_name(key), value)
    parser = cli.make_parser("test")
    add_engine_args(parser)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    return engine_config_from_args(args), serve_config_from_args(args)


def test_defaults_follow_the_guide(monkeypatch):
    engine, serve_config = parse([], monkeypatch=monkeypatch)
    assert engine.served_model_name == "DeepSeek-R1"
    assert engine.device == "cuda" and engine.tensor_parallel_size == 1
    assert serve_config.port == 8000 and serve_config.route_prefix == "/"


def test_env_vars_are_fallbacks_and_flags_win(monkeypatch):
    env = {"MODEL_PATH": "/models/r1", "SERVED_MODEL_NAME": "r1", "TENSOR_PARALLEL_SIZE": "8",
           "MAX_MODEL_LEN": "4096", "ENFORCE_EAGER": "true", "PORT": "9000"}
    engine, serve_config = parse(["--served-model-name", "flag-wins"], env, monkeypatch)
    assert engine.model == "/models/r1" and engine.served_model_name == "flag-wins"
    assert engine.tensor_parallel_size == 8 and engine.max_model_len == 4096
    assert engine.enforce_eager is True and serve_config.port == 9000


def test_invalid_env_value_exits_with_a_message(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_SERVE_TENSOR_PARALLEL_SIZE", "eight")
    with pytest.raises(cli.ScriptError) as exc:
        parse([], monkeypatch=monkeypatch)
    assert "DEEPSEEK_SERVE_TENSOR_PARALLEL_SIZE" in str(exc.value)
    assert exc.value.code == cli.EXIT_USAGE


def test_generic_env_names_change_nothing_and_are_named(monkeypatch, capsys):
    # Other tools set API_KEY, DEVICE, MODEL_PATH...: a stray one must not turn on auth with
    # someone else's key or deploy a CPU engine on a GPU cluster.
    monkeypatch.setattr(cli, "_warned_unprefixed", set())
    stray = {"API_KEY": "someone-elses", "DEVICE": "cpu", "MODEL_PATH": "/elsewhere",
             "DTYPE": "float16", "PORT": "1"}
    for key, value in stray.items():
        monkeypatch.setenv(key, value)
    engine, serve_config = parse([], monkeypatch=monkeypatch)
    defaults_engine, defaults_serve = EngineConfig(), ServeConfig()
    assert serve_config.api_key is None and serve_config.port == defaults_serve.port
    assert (engine.device, engine.model, engine.dtype) == (
        defaults_engine.device, defaults_engine.model, defaults_engine.dtype)
    err = capsys.readouterr().err
    assert ("warning: environment variable API_KEY is ignored (other tools use that name); "
            "set DEEPSEEK_SERVE_API_KEY for --api-key") in err
    assert all(f"variable {key} is ignored" in err for key in stray)


def test_a_script_error_becomes_one_line_and_its_exit_code(capsys):
    @cli.exits_with_codes
    def main() -> int:
        raise cli.ScriptError("no GPU in the cluster", cli.EXIT_TIMEOUT)

    assert main() == cli.EXIT_TIMEOUT
    assert capsys.readouterr().err == "error: no GPU in the cluster\n"


def test_help_shows_defaults_and_env_names(capsys):
    parser = cli.make_parser("test")
    add_engine_args(parser)
    add_serve_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines anywhere
    assert "[env: DEEPSEEK_SERVE_MODEL_PATH]" in text and "default: DeepSeek-R1" in text
    assert "--max-ongoing-requests" in text and "--api-key" in text


def test_cpu_device_gets_small_kv_cache_and_eager(monkeypatch):
    engine, _ = parse(["--device", "cpu"], monkeypatch=monkeypatch)
    kwargs = engine.engine_kwargs()
    assert kwargs["kv_cache_memory_bytes"] == 128 * 2**20 and kwargs["enforce_eager"] is True
    assert kwargs["dtype"] == "float32"  # the same answers on CPUs with and without AMX
    assert "distributed_executor_backend" not in kwargs
    assert replica_env(engine)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_validate_refuses_tensor_parallel_on_cpu():
    problems = EngineConfig(device="cpu", tensor_parallel_size=2).validate()
    assert any("--device cpu" in p for p in problems)


def test_tensor_parallel_replica_reserves_each_gpu_once():
    engine = EngineConfig(tensor_parallel_size=8)
    resources = replica_resources(engine, ServeConfig())
    bundles = resources["placement_group_bundles"]
    assert resources["placement_group_strategy"] == "STRICT_PACK"
    # The replica actor takes no GPU itself; the 8 bundles hold exactly 8 GPUs for vLLM.
    assert resources["ray_actor_options"]["num_gpus"] == 0
    assert sum(b.get("GPU", 0) for b in bundles) == 8 and len(bundles) == 8
    assert engine.engine_kwargs()["distributed_executor_backend"] == "ray"


def test_single_gpu_and_cpu_replicas():
    one = replica_resources(EngineConfig(), ServeConfig())
    assert one["ray_actor_options"]["num_gpus"] == 1 and "placement_group_bundles" not in one
    cpu = replica_resources(EngineConfig(device="cpu"), ServeConfig(cpus_per_replica=0.5))
    assert cpu["ray_actor_options"] == {**cpu["ray_actor_options"], "num_cpus": 0.5, "num_gpus": 0}


def test_deployment_options_keep_vllm_batching_unthrottled():
    options = deployment_options(EngineConfig(), ServeConfig(), num_replicas=2)
    # Serve's default (5) would starve vLLM's continuous batching.
    assert options["max_ongoing_requests"] >= 256 and options["num_replicas"] == 2


def test_replica_slots_cap_per_node_and_count_whole_fits():
    nodes = [{"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}, {"CPU": 4}]
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 1}, 8, nodes) == 16
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 1}, 4, nodes) == 8
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 8}, None, nodes) == 2
    assert replica_plan.replica_slots({"CPU": 1, "GPU": 16}, None, nodes) == 0


def test_resolve_replicas():
    assert replica_plan.resolve_replicas("auto", 16, 16) == 16
    assert replica_plan.resolve_replicas("auto", 20, 16) == 16
    assert replica_plan.resolve_replicas("auto", 5, 16, auto_default=1) == 1
    assert replica_plan.resolve_replicas("3", 16, 16) == 3
    for requested, slots, words in (("17", 16, "max-replicas"), ("auto", 0, "no node"),
                                     ("many", 16, "number")):
        with pytest.raises(cli.ScriptError, match=words) as refused:
            replica_plan.resolve_replicas(requested, slots, 16)
        assert refused.value.code == cli.EXIT_USAGE


def test_ingress_env_reaches_serve_and_the_operators_own_values_win(monkeypatch):
    from common.deploy_options import DEFAULT_INGRESS, controller_env

    assert DEFAULT_INGRESS == "haproxy"
    haproxy = controller_env("haproxy")
    assert haproxy["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert haproxy["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] == "0"
    assert haproxy["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in controller_env("proxy")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    assert controller_env("haproxy")["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_routing_sets_haproxys_balance_and_nothing_for_serves_proxy():
    from common.deploy_options import HAPROXY_BALANCE_ENV, controller_env

    assert controller_env("haproxy")[HAPROXY_BALANCE_ENV] == "leastconn"
    assert controller_env("haproxy", "session")[HAPROXY_BALANCE_ENV] == "hdr(x-session-id)"
    assert HAPROXY_BALANCE_ENV not in controller_env("proxy", "session")
    assert ServeConfig().routing == "auto"   # resolved when planned (test_replica_plan_unit.py)
    with pytest.raises(SystemExit):
        parse(["--routing", "sticky"])


def test_deployment_version_and_shipped_code_follow_the_replica_package_only(tmp_path,
                                                                              monkeypatch):
    import shutil
    from pathlib import Path

    from common import deploy_options

    package = deploy_options.replica_package_dir()
    shipped = deploy_options.replica_code_runtime_env()["py_modules"]
    assert shipped == [str(package)] and package.name == "replica"
    assert not (package / "loadgen.py").exists() and not (package / "cluster.py").exists()

    copy = tmp_path / "replica"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(deploy_options, "replica_package_dir", lambda: copy)
    version = deploy_options.deployment_version(EngineConfig(), ServeConfig())
    # An operator tool or the load generator changing leaves running replicas alone...
    (tmp_path / "loadgen.py").write_text("# edited\n")
    assert deploy_options.deployment_version(EngineConfig(), ServeConfig()) == version
    # ...the code replicas run changing restarts them.
    server = Path(copy / "server.py")
    server.write_text(server.read_text() + "\n# edited\n")
    assert deploy_options.deployment_version(EngineConfig(), ServeConfig()) != version


@pytest.mark.parametrize("limits", ["serve", "offline"])
def test_batch_limits_keep_vllm_serve_defaults_unless_offline_is_asked(limits, monkeypatch):
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from replica.engine import apply_offline_batch_limits

    engine, _ = parse(["--batch-limits", limits], monkeypatch=monkeypatch)
    assert engine.validate() == []
    # vLLM's own per-context defaults on this machine (the GPU ones differ only in size).
    tokens, seqs = AsyncEngineArgs.get_batch_defaults(engine.gpus_per_replica)
    args = AsyncEngineArgs(model=engine.model)
    apply_offline_batch_limits(args, engine)
    # None: vLLM then picks the API-server context's limits, exactly as `vllm serve` does.
    expected = ((tokens[UsageContext.LLM_CLASS], seqs[UsageContext.LLM_CLASS])
                if limits == "offline" else (None, None))
    assert (args.max_num_batched_tokens, args.max_num_seqs) == expected
    # An operator's own limit always stands.
    args = AsyncEngineArgs(model=engine.model, max_num_batched_tokens=4096)
    apply_offline_batch_limits(args, engine)
    assert args.max_num_batched_tokens == 4096


def test_batch_limits_default_and_env(monkeypatch):
    engine, _ = parse([], monkeypatch=monkeypatch)
    assert engine.batch_limits == "serve"
    engine, _ = parse([], env={"BATCH_LIMITS": "offline"}, monkeypatch=monkeypatch)
    assert engine.batch_limits == "offline"
    with pytest.raises(SystemExit):
        parse(["--batch-limits", "huge"], monkeypatch=monkeypatch)
