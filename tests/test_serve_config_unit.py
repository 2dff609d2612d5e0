"""--print-config: the Serve config and RayService a script writes, and the builders its import_path names."""
from __future__ import annotations

import pytest
import yaml

from common import builders, cli, serve_config
from common import cluster, placement
from common.deploy import parse_script_args, plan_and_build

TWO_GPU_NODES = [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}]
CPU_ARGS = ["--device", "cpu", "--model", "/models/demo", "--tensor-parallel-size", "1"]


def printed(script: str, argv: list[str], capsys) -> str:
    module = builders.load_script(script)
    assert module.main(argv) == cli.EXIT_OK
    return capsys.readouterr().out


def config_of(script: str, argv: list[str], capsys) -> dict:
    return yaml.safe_load(printed(script, ["--print-config", *argv], capsys))


@pytest.fixture
def two_gpu_nodes(monkeypatch):
    """The cluster the scripts read: the guide's 2 x 8 GPUs, without Ray."""
    monkeypatch.setattr(cluster, "list_nodes", lambda: [
        cluster.NodeInfo(node_id=f"node{i}", ip="127.0.0.1", alive=True, is_head=i == 0,
                         cpus_total=n["CPU"], cpus_available=n["CPU"], gpus_total=n["GPU"],
                         gpus_available=n["GPU"]) for i, n in enumerate(TWO_GPU_NODES)])
    monkeypatch.setattr(placement, "pick_distinct_nodes",
                        lambda demand, count, timeout_s, name: [f"node{i}" for i in range(count)])
    monkeypatch.setattr(cluster, "deployment_user_configs", lambda app: {})  # none runs


def test_config_holds_the_flags(capsys):
    config = config_of("ray-force-multi.py", [
        *CPU_ARGS, "--num-replicas", "3", "--max-ongoing-requests", "64", "--port", "9000",
        "--app-name", "llm", "--route-prefix", "/v1x", "--max-model-len", "4096",
        "--enable-auto-tool-choice"], capsys)
    serve_config.validate_document(config)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 9000}
    [app] = config["applications"]
    assert (app["name"], app["route_prefix"]) == ("llm", "/v1x")
    assert app["import_path"] == "common.builders:force_multi"
    assert app["args"]["max_model_len"] == 4096 and app["args"]["device"] == "cpu"
    assert app["args"]["vllm_args"] == ["--enable-auto-tool-choice"]
    assert app["runtime_env"]["working_dir"].startswith("local://")
    # Lightweight options only in the deployment section: changing them is no new code version.
    assert not {"max_ongoing_requests", "num_replicas", "port", "address"} & set(app["args"])
    [deployment] = app["deployments"]
    assert deployment["name"] == "LLMDeployment"
    assert (deployment["num_replicas"], deployment["max_ongoing_requests"]) == (3, 64)
    assert deployment["max_replicas_per_node"] == 1


def test_auto_without_a_cluster_needs_an_explicit_value(capsys, monkeypatch):
    from common import ray_connect

    def unreachable(*args, **kwargs):
        raise cli.ScriptError("cannot reach a Ray cluster", cli.EXIT_RAY_UNREACHABLE)

    monkeypatch.setattr(ray_connect, "connect", unreachable)
    module = builders.load_script("ray-force-multi.py")
    assert module.main(["--print-config", "--tensor-parallel-size", "auto"]) == cli.EXIT_USAGE
    assert "--tensor-parallel-size N" in capsys.readouterr().err
    module = builders.load_script("ray-single-gpu.py")
    assert module.main(["--print-config"]) == cli.EXIT_USAGE
    assert "--num-replicas N" in capsys.readouterr().err


def test_auto_resolved_on_a_reachable_cluster(capsys, monkeypatch, two_gpu_nodes):
    from common import layout, ray_connect

    def plan(request, engine, serve_config, memory_gib, argv):
        if request.tp == "auto":
            engine.tensor_parallel_size = 8
        print("layout: planned")

    monkeypatch.setattr(ray_connect, "connect", lambda *args, **kwargs: None)
    monkeypatch.setattr(layout, "resolve_layout", plan)
    [app] = config_of("ray-force-multi.py", ["--tensor-parallel-size", "auto"],
                      capsys)["applications"]
    assert app["args"]["tensor_parallel_size"] == 8
    [app] = config_of("ray-single-gpu.py", ["--num-replicas", "auto"], capsys)["applications"]
    assert app["deployments"][0]["num_replicas"] == 16


def test_bad_flags_keep_the_scripts_messages(capsys):
    module = builders.load_script("ray-product")
    code = module.main(["--print-config", *CPU_ARGS, "--max-ongoing-requests", "8"])
    assert code == cli.EXIT_USAGE
    assert "--target-ongoing-requests" in capsys.readouterr().err
    with pytest.raises(cli.ScriptError, match="unknown builder argument 'num_gpus'"):
        builders.force_multi({"num_gpus": 3})


def _deployments(app) -> dict:
    from ray.serve._private import build_app as serve_build_app
    from ray.serve.deployment import deployment_to_schema

    # Built as under the default --ingress haproxy, which --routing prefix's route deployment
    # needs (Serve reads RAY_SERVE_ENABLE_HA_PROXY once, on import).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_build_app, "RAY_SERVE_ENABLE_HA_PROXY", True)
        built = serve_build_app.build_app(app, name="test")
    return {d.name: deployment_to_schema(d).model_dump(exclude_unset=True)
            for d in built.deployments}


def _script_app(script: str, argv: list[str]):
    module = builders.load_script(script)
    parser = builders.script_parser_of(module)
    args, engine, serve_cfg, _ = parse_script_args(parser, argv)
    return plan_and_build(module.topology, getattr(module, "build", None), args, engine,
                          serve_cfg, cluster.list_nodes())


def _comparable(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in serve_config.LIGHTWEIGHT_ARGS
            and k not in ("autoscaling_config", "version")}


@pytest.mark.parametrize("script, argv", [
    ("ray-force-multi.py", ["--tensor-parallel-size", "8", "--num-replicas", "2"]),
    ("ray-force-multi.py", [*CPU_ARGS, "--num-replicas", "2", "--max-ongoing-requests", "64"]),
    ("ray-single-gpu.py", ["--num-replicas", "4", "--model", "/models/x", "--load-format",
                           "dummy"]),
    ("ray-single-gpu.py", ["--num-replicas", "4", "--model", "/models/x", "--gpus-per-replica",
                           "0.5", "--gpu-memory-utilization", "0.45"]),
    ("ray-product", ["--tensor-parallel-size", "8", "--max-replicas", "2"]),
    ("ray-placement-group.py", [*CPU_ARGS, "--num-backends", "2"]),
    ("ray-placement-group.py", ["--tensor-parallel-size", "8"]),     # --routing auto: prefix
])
def test_builder_builds_what_the_script_deploys(script, argv, capsys, two_gpu_nodes):
    config = config_of(script, argv, capsys)
    [app] = config["applications"]
    module_name, function = app["import_path"].split(":")
    assert module_name == "common.builders"
    from_builder = _deployments(getattr(builders, function)(app["args"]))
    from_script = _deployments(_script_app(script, argv))
    assert set(from_builder) == set(from_script)
    for name, options in from_script.items():
        assert _comparable(from_builder[name]) == _comparable(options), name
    # What the config's deployments section says is what the script deploys.
    for entry in app["deployments"]:
        options = from_script[entry["name"]]
        for key, value in entry.items():
            if key == "name":
                continue
            if key == "ray_actor_options":
                assert {k: options[key][k] for k in value} == value
            else:
                assert options[key] == value, key


def test_rayservice_holds_the_config(capsys):
    argv = ["--tensor-parallel-size", "8", "--model", "/models/DeepSeek-R1"]
    config_text = printed("ray-force-multi.py", ["--print-config", *argv,
                                                 "--working-dir", "local:///app"], capsys)
    manifest = yaml.safe_load(printed("ray-force-multi.py",
                                      ["--print-config", "--kuberay", *argv], capsys))
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["serveConfigV2"] == config_text
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(config_text)
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    [workers] = cluster["workerGroupSpecs"]
    assert workers["groupName"] and workers["rayStartParams"] is not None
    # The guide's cluster: two 8-GPU workers, one TP=8 replica each.
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    for group in (head, workers):
        [container] = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        # --routing auto is prefix here (GPU engines, 2 replicas): HAProxy hands the body on.
        assert env["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"]["value"] == "1"
    [app] = yaml.safe_load(config_text)["applications"]
    assert app["args"]["routing"] == "prefix"
    assert builders.load_script("ray-force-multi.py").main(["--print-config", *argv]) == 0
    assert "--routing auto: prefix (GPU engines, up to 2 replicas" in capsys.readouterr().err
    [worker] = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8


def requested_gpus(manifest: dict) -> int:
    return sum(group["replicas"] * group["template"]["spec"]["containers"][0]["resources"]
               ["limits"].get("nvidia.com/gpu", 0)
               for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"])


@pytest.mark.parametrize("script, argv", [
    ("ray-force-multi.py", []),
    ("ray-single-gpu.py", ["--num-replicas", "16"]),
    ("ray-placement-group.py", []),
    ("ray-product", []),
])
def test_rayservice_asks_for_the_gpus_the_guides_topology_uses(script, argv, capsys):
    """The guide's defaults use 2 x 8 GPUs; the placement-group router holds none."""
    manifest = yaml.safe_load(printed(script, ["--print-config", "--kuberay", *argv], capsys))
    assert requested_gpus(manifest) == 16
    [workers] = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"] == resources["requests"]
    assert resources["limits"]["cpu"] == "32" and resources["limits"]["memory"] == "256Gi"


def test_worker_pod_size_from_flags(capsys):
    manifest = yaml.safe_load(printed("ray-force-multi.py", [
        "--print-config", "--kuberay", "--pod-cpus", "96", "--pod-memory-gib", "1024"], capsys))
    [workers] = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (limits["cpu"], limits["memory"], limits["nvidia.com/gpu"]) == ("96", "1024Gi", 8)
    cpu = yaml.safe_load(printed("ray-force-multi.py", [
        "--print-config", "--kuberay", *CPU_ARGS, "--num-replicas", "2"], capsys))
    [workers] = cpu["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and workers["replicas"] == 2
    assert (limits["cpu"], limits["memory"]) == ("3", "8Gi")


def test_gcs_fault_tolerance_only_when_a_redis_is_given(capsys):
    plain = yaml.safe_load(printed("ray-force-multi.py", ["--print-config", "--kuberay"], capsys))
    assert "gcsFaultToleranceOptions" not in plain["spec"]["rayClusterConfig"]
    manifest = yaml.safe_load(printed("ray-force-multi.py", [
        "--print-config", "--kuberay", "--redis-address", "redis.ha:6379",
        "--redis-secret", "gcs-redis"], capsys))
    options = manifest["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "redis.ha:6379", "redisPassword": {
        "valueFrom": {"secretKeyRef": {"name": "gcs-redis", "key": "password"}}}}
    # Deploy-side settings, not part of the application.
    assert "redis" not in manifest["spec"]["serveConfigV2"]


def test_worker_groups_from_the_topology():
    from replica.config import EngineConfig

    tp8 = EngineConfig(tensor_parallel_size=8)
    assert serve_config.worker_groups(tp8, [{"num_replicas": 2}], 8) == (2, 8)
    assert serve_config.worker_groups(tp8, [{"autoscaling_config": {"max_replicas": 3}}],
                                      8) == (3, 8)
    one = EngineConfig()
    assert serve_config.worker_groups(one, [{"num_replicas": 16, "max_replicas_per_node": 8}],
                                      8) == (2, 8)
    assert serve_config.worker_groups(EngineConfig(device="cpu"), [{"num_replicas": 2}],
                                      8) == (2, 0)
    router = {"name": "Router", "num_replicas": 1}
    assert serve_config.worker_groups(EngineConfig(tensor_parallel_size=8),
                                      [{"num_replicas": 1}, {"num_replicas": 1}, router],
                                      8) == (2, 8)
    with pytest.raises(cli.ScriptError, match="GPUs on one node"):
        serve_config.worker_groups(EngineConfig(tensor_parallel_size=16), [{}], 8)


def test_plan_reads_a_config_or_its_rayservice(capsys, tmp_path):
    from ops import config_check

    argv = ["--print-config", "--tensor-parallel-size", "8", "--model", "/models/R1"]
    config = tmp_path / "config.yaml"
    config.write_text(printed("ray-product", argv, capsys))
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text(printed("ray-product", [*argv, "--kuberay"], capsys))
    document = config_check.read_config(str(config))
    [app] = document["applications"]
    assert config_check.script_of(app) == "ray-product"
    assert config_check.planned_replicas(app) == 2          # autoscaling's maximum
    assert config_check.read_config(str(manifest))["applications"][0]["args"] == app["args"]
    # The env `ray start` needs for it: prefix's (auto resolved to it for 2 GPU replicas).
    assert app["args"]["routing"] == "prefix"
    assert config_check.controller_routing(document) == "prefix"
    for args, routing in (({"routing": "spread"}, "spread"), ({}, "prefix"),
                          ({"routing": "session"}, "session")):
        assert config_check.controller_routing({"applications": [{"args": args}]}) == routing
    config.write_text("applications: [{name: x, import_path: 3}]")
    with pytest.raises(cli.ScriptError, match="invalid"):
        config_check.read_config(str(config))
    assert config_check.local_dir_of("local:///app") == "/app"
    assert config_check.local_dir_of("https://x/y.zip") is None


def test_router_replicas_run_like_engine_replicas(monkeypatch):
    # The router's limits add up to the backends' own; its Serve settings are the engine
    # replicas' (code on Serve's loop, JSON errors), each replaced by what the operator set.
    from common.deploy_options import router_options
    from replica.config import ServeConfig

    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    options = router_options(ServeConfig(max_ongoing_requests=100, env_vars={"X": "1"}),
                             backends=2, replicas=4)
    assert (options["num_replicas"], options["max_ongoing_requests"]) == (4, 50)
    assert options["backpressure_config"]["status_code"] == 503
    actor = options["ray_actor_options"]
    assert actor["num_cpus"] == 0
    env = actor["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == (
        "replica.serve_errors:json_error_middlewares")
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert env["X"] == "1"


def test_the_image_recipe_installs_a_tested_pair_where_the_manifest_looks():
    """The Dockerfile the README builds for --kuberay: Ray as pinned, a tested vLLM, the project
    at --image-workdir's default."""
    import re
    from pathlib import Path

    from replica import versions

    root = Path(serve_config.PROJECT_ROOT)
    recipe = (root / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", recipe, re.M))
    ray_pin = re.search(r"^ray\[serve\]==(\S+)$", (root / "requirements.txt").read_text(), re.M)
    assert ray_pin and args["RAY_VERSION"] == ray_pin.group(1)
    assert versions.is_tested(args["RAY_VERSION"], args["VLLM_VERSION"])
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", recipe, re.M)
    assert f"WORKDIR {script_default('--image-workdir')}" in recipe
    build = f"docker build -t {script_default('--image')} ."
    assert build in recipe and build in (root / "docs" / "declarative.md").read_text()


def script_default(flag: str):
    from common.deploy import script_parser

    parser = script_parser("test")
    return next(a.default for a in parser._actions if flag in a.option_strings)


def test_wide_ep_config_is_one_gang_of_one_gpu_ranks_serve_accepts(capsys):
    config = config_of("ray-force-multi.py",
                       ["--data-parallel-size", "16", "--enable-expert-parallel"], capsys)
    serve_config.validate_document(config)
    [app] = config["applications"]
    args = app["args"]
    # The script's own defaults (2 replicas of tensor parallel 8) are not a rank's.
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (1, 1)
    assert (args["data_parallel_size"], args["enable_expert_parallel"]) == (16, True)
    [deployment] = app["deployments"]
    assert deployment["num_replicas"] == 16
    assert deployment["gang_scheduling_config"] == {
        "gang_size": 16, "gang_placement_strategy": "PACK",
        "runtime_failure_policy": "RESTART_GANG"}
    assert deployment["ray_actor_options"]["num_gpus"] == 1.0
    # Serve refuses both beside a gang.
    assert "max_replicas_per_node" not in deployment
    assert "placement_group_strategy" not in deployment


def test_wide_ep_autoscaling_counts_gangs(capsys):
    config = config_of("ray-product", ["--data-parallel-size", "8", "--min-replicas", "1",
                                       "--max-replicas", "2"], capsys)
    serve_config.validate_document(config)
    [deployment] = config["applications"][0]["deployments"]
    scaling = deployment["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (8, 16)
    assert deployment["gang_scheduling_config"]["gang_size"] == 8


@pytest.mark.parametrize("argv, message", [
    (["--data-parallel-size", "2", "--pipeline-parallel-size", "2"],
     "tensor parallel on one node at most"),
    (["--data-parallel-size", "2", "--data-parallel-rank", "1"], "--data-parallel-rank"),
    (["-dp", "2"], "--data-parallel-size is this script's flag"),
])
def test_data_parallel_flags_the_gang_owns_are_refused(argv, message, capsys):
    module = builders.load_script("ray-force-multi.py")
    assert module.main(["--print-config", *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_wide_ep_ranks_of_tensor_parallel_2_take_their_bundles_into_the_gang(capsys):
    config = config_of("ray-force-multi.py", ["--data-parallel-size", "8",
                                              "--tensor-parallel-size", "2",
                                              "--enable-expert-parallel"], capsys)
    serve_config.validate_document(config)
    [deployment] = config["applications"][0]["deployments"]
    assert deployment["num_replicas"] == 8
    assert deployment["gang_scheduling_config"]["gang_size"] == 8
    # two GPU bundles per rank, no strategy of the rank's own (Serve's gang group places them)
    assert [b.get("GPU") for b in deployment["placement_group_bundles"]] == [1, 1]
    assert "placement_group_strategy" not in deployment


def test_placement_group_backends_are_no_data_parallel_gangs(capsys):
    module = builders.load_script("ray-placement-group.py")
    assert module.main(["--print-config", "--data-parallel-size", "2"]) == cli.EXIT_USAGE
    assert "gangs are ray-force-multi.py's" in capsys.readouterr().err

