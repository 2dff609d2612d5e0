"""scripts/run_tests.py: how the modules are split into shards, and a shard's progress line."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import run_tests


def test_every_module_lands_in_exactly_one_shard_and_the_shards_are_balanced():
    files = [f"tests/{name}" for name in run_tests.WEIGHTS_S] + [
        "tests/test_new.py", "tests/test_a_unit.py", "tests/test_b_unit.py"]
    shards = run_tests.split(files, 2)
    assert sorted(f for shard in shards for f in shard) == sorted(files)
    totals = [sum(run_tests.module_weight(f) for f in shard) for shard in shards]
    assert max(totals) - min(totals) <= max(run_tests.WEIGHTS_S.values())
    assert all(shard == sorted(shard) for shard in shards)


def test_one_shard_is_the_whole_suite_and_empty_shards_are_dropped():
    files = ["tests/test_operator.py", "tests/test_x_unit.py"]
    assert run_tests.split(files, 1) == [sorted(files)]
    assert run_tests.split(files, 5) == [["tests/test_operator.py"], ["tests/test_x_unit.py"]]


def test_progress_is_the_last_percentage_pytest_printed(tmp_path):
    log = tmp_path / "shard0.log"
    log.write_text("")
    assert run_tests.progress(log) == "starting"
    log.write_text("....   [ 12%]\n..F.   [ 40%]\n..")
    assert run_tests.progress(log) == "40%"


def test_the_reliability_suite_is_exactly_the_modules_marked_reliability():
    tests = Path(__file__).resolve().parent
    mark = re.compile(r"^(pytestmark = pytest\.mark\.reliability|@pytest\.mark\.reliability)$",
                      re.M)
    marked = {p.name for p in tests.glob("test_*.py") if mark.search(p.read_text())}
    assert marked == set(run_tests.RELIABILITY)
    main = {p.name for p in run_tests.suite_modules(tests, "main")}
    reliability = {p.name for p in run_tests.suite_modules(tests, "reliability")}
    assert reliability == marked and not main & reliability
    assert main | reliability == {p.name for p in tests.glob("test_*.py")}
