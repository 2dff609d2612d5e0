"""Unit test: docs/flags.md's flag tables are what the scripts' parsers declare (regenerate: python -m common.flag_docs --write)."""
from __future__ import annotations

from common import flag_docs


def test_the_docs_flag_tables_match_the_scripts():
    assert flag_docs.current() == flag_docs.render(), (
        "docs/flags.md is out of date: run `python -m common.flag_docs --write`")


def test_every_flag_of_every_script_is_in_the_tables():
    text = flag_docs.render()
    for script in flag_docs.DEPLOY_SCRIPTS:
        for flag in flag_docs.rows(flag_docs.deploy_parser(script)):
            assert f"| `{flag}` |" in text, (script, flag)
    assert "| `--seed` |" not in text.split("### `load_test.py`")[0], (
        "vLLM's own --seed is passed to vLLM's parser, not declared again")
