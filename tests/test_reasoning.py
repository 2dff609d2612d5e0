"""Unit tests of the DeepSeek-R1 reasoning splitter (common/reasoning.py) on hand-written streams."""
from __future__ import annotations

import random

import pytest

from common import reasoning
from common.reasoning import ReasoningParser, split


def run_stream(chunks: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    parser = ReasoningParser()
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish())
    reasoning_text = "".join(r for r, _ in deltas)
    content = "".join(c for _, c in deltas)
    assert (reasoning_text, content) == (parser.reasoning, parser.content)
    return reasoning_text, content, deltas


CASES = [
    # (name, full output, expected reasoning, expected content)
    ("template opened think", "Let me think.\n</think>\n\nThe answer is 4.",
     "Let me think.\n", "\n\nThe answer is 4."),
    ("model writes opening tag", "<think>\nhmm</think>Answer", "\nhmm", "Answer"),
    ("opening tag after whitespace", "\n <think>x</think>y", "x", "y"),
    ("missing end marker", "still thinking when cut off", "still thinking when cut off", ""),
    ("empty reasoning", "</think>Just the answer", "", "Just the answer"),
    ("empty reasoning with tags", "<think></think>ok", "", "ok"),
    ("no markers at all, empty", "", "", ""),
    ("later markers stay in content", "a</think>b</think>c<think>d", "a", "b</think>c<think>d"),
    ("think inside reasoning stays", "x <think> y</think>z", "x <think> y", "z"),
    ("partial marker at the end is text", "reasoning </thi", "reasoning </thi", ""),
    ("lone less-than", "a < b</think>c < d", "a < b", "c < d"),
    ("unicode", "思考中……</think>答案", "思考中……", "答案"),
]


@pytest.mark.parametrize("name,text,want_reasoning,want_content", CASES,
                         ids=[c[0] for c in CASES])
def test_whole_output_split(name, text, want_reasoning, want_content):
    assert split(text) == (want_reasoning, want_content)


@pytest.mark.parametrize("name,text,want_reasoning,want_content", CASES,
                         ids=[c[0] for c in CASES])
def test_any_chunking_gives_the_same_split(name, text, want_reasoning, want_content):
    # One character at a time splits every marker across chunks.
    assert run_stream(list(text))[:2] == (want_reasoning, want_content)
    rng = random.Random(name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run_stream(chunks)[:2] == (want_reasoning, want_content), chunks


def test_end_marker_split_across_chunks_is_held_then_routed():
    parser = ReasoningParser()
    assert parser.feed("I think </th") == ("I think ", "")   # "</th" may be the marker: held
    assert parser.feed("ink>\n\nAnswer") == ("", "\n\nAnswer")
    assert parser.finish() == ("", "")
    assert not parser.in_reasoning


def test_held_text_that_is_not_a_marker_is_released():
    parser = ReasoningParser()
    assert parser.feed("a </t") == ("a ", "")
    assert parser.feed("able") == ("</table", "")
    assert parser.in_reasoning


def test_opening_tag_split_across_chunks():
    parser = ReasoningParser()
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>abc") == ("abc", "")
    assert parser.feed("</think>def") == ("", "def")


def test_empty_deltas_change_nothing():
    _, _, deltas = run_stream(["", "x", "", "</think>", "", "y", ""])
    assert "".join(r for r, _ in deltas) == "x" and "".join(c for _, c in deltas) == "y"


def test_auto_is_on_for_r1_names_only():
    assert reasoning.enabled("auto", "DeepSeek-R1", "/models/x")
    assert reasoning.enabled("auto", "my-model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    assert not reasoning.enabled("auto", "qwen2.5-7b", "/models/Qwen2.5-7B")
    assert reasoning.enabled("deepseek_r1", "qwen", "/m")
    assert not reasoning.enabled("none", "DeepSeek-R1", "/m")
    with pytest.raises(ValueError):
        reasoning.enabled("bogus", "x", "y")
