"""Unit tests: the vLLM seam names each missing internal with the installed and the tested versions."""
from __future__ import annotations

import argparse
import enum
import importlib
import sys
import types
from typing import Any

import pytest

from replica import vllm_compat
from replica.config import EngineConfig
from replica.vllm_compat import Need, VllmIncompatible

# Every need of a replica with every feature on, in the layout of the installed vLLM (0.32.0:
# test_the_installed_vllm_is_complete checks that it is the launchers layout).
EVERYTHING = dict(engine_metrics=True, batch_limits="offline", device="cuda")
NEEDS: list[Need] = [*vllm_compat.LAYOUTS["launchers"].values(),
                     *(need for need, _ in vllm_compat.needs(**EVERYTHING))]
TESTED = "tested pairs: Ray 2.60.0 + vLLM 0.26.0 (cuda)"


def assert_clear(message: str, *names: str) -> None:
    """One message naming the missing things, the installed vLLM and the tested pairs."""
    for name in names:
        assert name in message, (name, message)
    assert f"the installed vLLM {vllm_compat.vllm_version()} lacks" in message, message
    assert TESTED in message, message


def problems_naming(name: str, **settings: Any) -> list[str]:
    problems = vllm_compat.check(**(settings or EVERYTHING))
    assert problems, f"check() found nothing wrong with {name} gone"
    return [p for p in problems if name in p]


# ---- taking a vLLM internal away (restored by monkeypatch) ---------------------------------


def _owner_and_name(need: Need) -> tuple[Any, str]:
    owner: Any = importlib.import_module(need.module)
    *path, name = need.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _hide_in_module(monkeypatch, module: types.ModuleType, name: str, replacement: Any) -> None:
    """`module.name` gone (replacement None) or replaced, also where the module exports it
    lazily through its __getattr__ (vllm.AsyncEngineArgs, vllm.SamplingParams)."""
    if name in vars(module):
        if replacement is None:
            monkeypatch.delattr(module, name)
        else:
            monkeypatch.setattr(module, name, replacement)
        return
    lazy = module.__getattr__  # type: ignore[attr-defined]

    def hiding(attr: str) -> Any:
        if attr != name:
            return lazy(attr)
        if replacement is None:
            raise AttributeError(attr)
        return replacement

    monkeypatch.setattr(module, "__getattr__", hiding)


def remove_symbol(monkeypatch, need: Need) -> None:
    owner, name = _owner_and_name(need)
    if isinstance(owner, types.ModuleType):
        _hide_in_module(monkeypatch, owner, name, None)
        return
    for klass in owner.__mro__[:-1]:  # wherever it is defined (object aside)
        if name in vars(klass):
            monkeypatch.delattr(klass, name)


def remove_member(monkeypatch, need: Need, member: str) -> None:
    owner, name = _owner_and_name(need)
    obj = getattr(owner, name)
    if isinstance(obj, enum.EnumMeta):  # enum members cannot be deleted: a copy without it
        smaller = enum.Enum(obj.__name__, {m.name: m.value for m in obj if m.name != member})
        _hide_in_module(monkeypatch, owner, name, smaller)
        return
    fields = getattr(obj, "__dataclass_fields__", None)
    if fields is not None and member in fields:
        monkeypatch.delitem(fields, member)
    for keys in ("__required_keys__", "__optional_keys__"):  # a TypedDict's keys
        if member in getattr(obj, keys, ()):
            monkeypatch.setattr(obj, keys, frozenset(getattr(obj, keys)) - {member})
    for klass in obj.__mro__[:-1]:
        if member in vars(klass):
            monkeypatch.delattr(klass, member)


def _renamed(renamed: object = None) -> None:
    """A stand-in that takes none of the parameters the project passes."""


def change_signature(monkeypatch, need: Need) -> None:
    owner, name = _owner_and_name(need)
    original = getattr(owner, name)
    if isinstance(original, type):
        stand_in: Any = type(original.__name__, (), {"__init__": lambda self, renamed=None: None})
    else:
        stand_in = _renamed
    if isinstance(owner, types.ModuleType):
        _hide_in_module(monkeypatch, owner, name, stand_in)
    else:
        monkeypatch.setattr(owner, name, staticmethod(stand_in))


# ---- the installed vLLM ---------------------------------------------------------------------


def test_the_installed_vllm_is_complete():
    assert vllm_compat.layout() == "launchers"
    for engine_metrics in (True, False):
        for batch_limits, device in (("offline", "cuda"), ("serve", "cuda"), ("serve", "cpu")):
            assert vllm_compat.check(engine_metrics, batch_limits, device) == []


@pytest.mark.parametrize("need", NEEDS, ids=lambda need: need.name)
def test_a_missing_symbol_is_named_with_the_versions(monkeypatch, need):
    remove_symbol(monkeypatch, need)
    named = problems_naming(need.name)
    assert named, vllm_compat.check(**EVERYTHING)
    assert_clear(named[0], need.name)
    with pytest.raises(VllmIncompatible) as raised:
        vllm_compat.resolve(need)
    assert_clear(str(raised.value), need.name)


MEMBERS = [(need, member) for need in NEEDS for member in need.members]


@pytest.mark.parametrize("need, member", MEMBERS,
                         ids=[f"{need.name}.{member}" for need, member in MEMBERS])
def test_a_missing_member_is_named_with_the_versions(monkeypatch, need, member):
    remove_member(monkeypatch, need, member)
    named = problems_naming(f"{need.name}.{member}")
    assert named, vllm_compat.check(**EVERYTHING)
    assert_clear(named[0], f"{need.name}.{member}")


@pytest.mark.parametrize("need", [need for need in NEEDS if need.params],
                         ids=lambda need: need.name)
def test_a_changed_signature_is_named_with_the_versions(monkeypatch, need):
    change_signature(monkeypatch, need)
    named = problems_naming(need.name)
    assert named, vllm_compat.check(**EVERYTHING)
    assert_clear(named[0], need.name, *need.params)


MODULES = sorted({need.module for need in NEEDS} - {"vllm"})


@pytest.mark.parametrize("module", MODULES)
def test_a_missing_module_is_named_with_the_versions(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import then raises ModuleNotFoundError
    named = problems_naming(f"the module {module}")
    assert named, vllm_compat.check(**EVERYTHING)
    assert_clear(named[0], module)


def test_no_vllm_at_all_is_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    (problem,) = vllm_compat.check(**EVERYTHING)
    assert "vLLM is not importable here" in problem and TESTED in problem
    with pytest.raises(VllmIncompatible, match="vLLM is not importable here"):
        vllm_compat.vllm_version()
    with pytest.raises(VllmIncompatible, match="vLLM is not importable here"):
        vllm_compat.serve_arg_parser()


def test_a_vllm_without_a_version_says_so_instead_of_unknown(monkeypatch):
    import vllm

    monkeypatch.delattr(vllm, "__version__")
    with pytest.raises(VllmIncompatible) as raised:
        vllm_compat.vllm_version()
    message = str(raised.value)
    assert "vLLM of unknown version lacks vllm.__version__" in message and TESTED in message


# ---- the two server layouts -------------------------------------------------------------------


def test_without_the_launchers_package_the_openai_layout_is_required_whole(monkeypatch):
    monkeypatch.setitem(sys.modules, vllm_compat.LAUNCHERS_PACKAGE, None)
    assert vllm_compat.layout() == "openai"
    # vLLM 0.32 keeps aliases in vllm.entrypoints.openai.api_server, not cli_args: the old layout
    # is incomplete here, and says which piece is missing.
    named = problems_naming("the module vllm.entrypoints.openai.cli_args")
    assert_clear(named[0], "vllm.entrypoints.openai.cli_args")
    with pytest.raises(VllmIncompatible, match="vllm.entrypoints.openai.cli_args"):
        vllm_compat.serve_arg_parser()


def test_the_openai_layout_works_where_its_modules_are_there(monkeypatch):
    """vLLM 0.26's module paths (its pieces are 0.32's, moved back where 0.26 had them)."""
    from vllm.entrypoints.launchers import app, cli_args, launcher
    from vllm.entrypoints.launchers.api_server import app_state

    old = {"vllm.entrypoints.openai.cli_args": {"make_arg_parser": cli_args.make_arg_parser},
           "vllm.entrypoints.openai.api_server": {"build_app": app.build_app,
                                                  "init_app_state": app_state.init_app_state},
           "vllm.entrypoints.launcher": {"terminate_if_errored": launcher.terminate_if_errored}}
    monkeypatch.setitem(sys.modules, vllm_compat.LAUNCHERS_PACKAGE, None)
    for name, symbols in old.items():
        module = types.ModuleType(name)
        module.__dict__.update(symbols)
        monkeypatch.setitem(sys.modules, name, module)
    assert vllm_compat.layout() == "openai"
    assert vllm_compat.check(**EVERYTHING) == []
    assert vllm_compat.serve_arg_parser().parse_args(["--model", "m"]).model == "m"


# ---- features that fail loudly instead of switching themselves off ------------------------------


def test_engine_metrics_on_a_vllm_without_the_ray_logger_refuse_with_the_way_out(monkeypatch):
    import vllm.v1.metrics.ray_wrappers as ray_wrappers

    from replica.engine import engine_stat_loggers

    monkeypatch.delattr(ray_wrappers, "RayPrometheusStatLogger")
    (problem,) = vllm_compat.check(engine_metrics=True, batch_limits="serve", device="cpu")
    assert_clear(problem, "vllm.v1.metrics.ray_wrappers.RayPrometheusStatLogger",
                 "--engine-metrics false")
    assert vllm_compat.check(engine_metrics=False, batch_limits="serve", device="cpu") == []
    with pytest.raises(VllmIncompatible, match="--engine-metrics false"):
        engine_stat_loggers(EngineConfig(engine_metrics=True))
    assert engine_stat_loggers(EngineConfig(engine_metrics=False)) is None


def test_engine_metrics_use_the_labelled_ray_logger():
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    from replica.engine import engine_stat_loggers

    (logger_cls,) = engine_stat_loggers(EngineConfig(engine_metrics=True))
    assert issubclass(logger_cls, RayPrometheusStatLogger) and logger_cls.__name__.startswith(
        "Labelled")


def test_metric_wrappers_without_the_hooks_are_refused_not_left_unlabelled():
    class Wrapper:  # set/inc/observe, but neither _get_tag_keys nor _build_tags
        def labels(self): ...
        def set(self, value): ...
        def inc(self, value): ...
        def observe(self, value): ...

    class Logger:
        _gauge_cls = _counter_cls = _histogram_cls = Wrapper

    with pytest.raises(VllmIncompatible) as raised:
        vllm_compat.labelled_stat_logger(Logger, {"application": "a"})
    assert_clear(str(raised.value), "Logger._gauge_cls._get_tag_keys", "_build_tags",
                 "--engine-metrics false")


def test_offline_batch_limits_with_a_changed_signature_are_an_error(monkeypatch):
    from vllm import AsyncEngineArgs

    from replica.engine import apply_offline_batch_limits

    monkeypatch.setattr(AsyncEngineArgs, "get_batch_defaults",
                        classmethod(lambda cls, gpus, usage: ({}, {})))
    engine = EngineConfig(batch_limits="offline", device="cuda")
    with pytest.raises(VllmIncompatible) as raised:
        apply_offline_batch_limits(AsyncEngineArgs(model="m"), engine)
    assert_clear(str(raised.value), "world_size", "AsyncEngineArgs.get_batch_defaults",
                 "--batch-limits serve")
    (problem,) = vllm_compat.check(engine_metrics=False, batch_limits="offline", device="cuda")
    assert "world_size" in problem
    # Only --batch-limits offline on GPUs uses it.
    assert vllm_compat.check(engine_metrics=False, batch_limits="serve", device="cuda") == []
    assert vllm_compat.check(engine_metrics=False, batch_limits="offline", device="cpu") == []
    apply_offline_batch_limits(AsyncEngineArgs(model="m"), EngineConfig(batch_limits="serve"))


def test_offline_batch_limits_do_not_swallow_vllms_own_errors(monkeypatch):
    from vllm import AsyncEngineArgs

    from replica.engine import apply_offline_batch_limits

    def broken(cls, world_size):
        raise TypeError("changed inside")

    monkeypatch.setattr(AsyncEngineArgs, "get_batch_defaults", classmethod(broken))
    with pytest.raises(TypeError, match="changed inside"):
        apply_offline_batch_limits(AsyncEngineArgs(model="m"),
                                   EngineConfig(batch_limits="offline", device="cuda"))


# ---- what the replica sets on vllm serve's arguments and reads of its engine -------------------


def test_serve_arguments_the_replica_sets_are_checked():
    args = vllm_compat.serve_arg_parser().parse_args(["--model", "m"])
    vllm_compat.set_reasoning_parser(args, "deepseek_r1")
    vllm_compat.set_request_logging(args, True)
    assert args.reasoning_parser == "deepseek_r1" and args.enable_log_requests is True
    assert args.structured_outputs_config.reasoning_parser == "deepseek_r1"
    old = argparse.Namespace(enable_log_requests=False, structured_outputs_config=None)
    with pytest.raises(VllmIncompatible) as raised:
        vllm_compat.set_reasoning_parser(old, "deepseek_r1")
    assert_clear(str(raised.value), "vllm serve's argument reasoning_parser")
    no_field = argparse.Namespace(enable_log_requests=False, reasoning_parser="",
                                  structured_outputs_config=types.SimpleNamespace())
    with pytest.raises(VllmIncompatible, match="structured_outputs_config.reasoning_parser"):
        vllm_compat.set_request_logging(no_field, False)


def test_an_engine_without_the_attributes_the_replica_reads_is_refused():
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=8))
    with pytest.raises(VllmIncompatible) as raised:
        vllm_compat.check_engine(engine)
    assert_clear(str(raised.value), "vllm.v1.engine.async_llm.AsyncLLM.output_processor")


def test_start_engine_shuts_an_incomplete_engine_down(monkeypatch):
    from vllm.v1.engine.async_llm import AsyncLLM

    stopped = []
    engine = types.SimpleNamespace(shutdown=lambda: stopped.append(True))
    monkeypatch.setattr(AsyncLLM, "from_vllm_config", classmethod(
        lambda cls, vllm_config, usage_context, enable_log_requests, disable_log_stats,
        stat_loggers: engine))
    engine_args = types.SimpleNamespace(enable_log_requests=False, disable_log_stats=True)
    with pytest.raises(VllmIncompatible, match="AsyncLLM.model_config"):
        vllm_compat.start_engine(object(), engine_args, None)
    assert stopped == [True]


def test_engine_accessors_and_abort_counting():
    import asyncio

    calls = []

    async def abort(request_id):
        calls.append(request_id)

    processor = types.SimpleNamespace(get_num_unfinished_requests=lambda: 3)
    engine = types.SimpleNamespace(errored=False, dead_error=None, abort=abort,
                                   output_processor=processor,
                                   model_config=types.SimpleNamespace(max_model_len=512))
    aborted = []
    vllm_compat.count_aborts(engine, lambda: aborted.append(1))
    asyncio.run(engine.abort("r1"))
    assert calls == ["r1"] and aborted == [1]
    assert vllm_compat.unfinished_requests(engine) == 3
    assert vllm_compat.max_model_len(engine) == 512
    assert vllm_compat.engine_errored(engine) is False


def test_engine_arg_fields_are_vllms():
    from vllm import AsyncEngineArgs

    fields = vllm_compat.engine_arg_fields()
    assert {"max_num_seqs", "enable_log_requests"} <= fields
    assert fields == set(AsyncEngineArgs.__dataclass_fields__)
