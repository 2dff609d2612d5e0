"""Splits DeepSeek-R1 output into reasoning (inside <think>...</think>) and answer, whole or streamed."""
from __future__ import annotations

import os

THINK_START = "<think>"
THINK_END = "</think>"
PARSERS = ("auto", "deepseek_r1", "none")


def enabled(parser: str, served_model_name: str, model_path: str) -> bool:
    """Whether the split is on. auto: for R1-family models, i.e. when the served name or the
    model path contains "r1" (DeepSeek-R1, its distills, QwQ-style R1 derivatives named so)."""
    if parser == "deepseek_r1":
        return True
    if parser == "none":
        return False
    if parser != "auto":
        raise ValueError(f"reasoning parser must be one of {', '.join(PARSERS)}, got {parser!r}")
    names = (served_model_name or "", os.path.basename(str(model_path or "").rstrip("/")),
             str(model_path or ""))
    return any("r1" in name.lower() for name in names)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`: those
    characters may be the first half of a marker split across two deltas, so they wait."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ReasoningParser:
    """Streaming DeepSeek-R1 splitter: feed text deltas, get (reasoning_delta, content_delta).

    R1's chat template ends the prompt with "<think>\\n", so the model's output usually starts
    inside the reasoning with no opening tag and only "</think>" marks the answer; older
    templates let the model write "<think>" itself. Both work: an opening tag at the very start
    (after whitespace) is dropped, everything up to the first "</think>" is reasoning, everything
    after it is the answer (later markers are kept as text). With no "</think>" at all, the
    whole output is reasoning, as vLLM's deepseek_r1 parser does: the model was cut off (or never
    finished thinking) before answering.

    A marker may arrive split over several deltas ("</th" + "ink>"): text that could be the
    start of the marker being looked for is held back until the next delta or `finish()`.
    """

    def __init__(self, start: str = THINK_START, end: str = THINK_END):
        self.start = start
        self.end = end
        self._state = "opening"   # opening -> reasoning -> content
        self._held = ""
        self.reasoning = ""       # totals so far, for the non-streaming body and logs
        self.content = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state != "content"

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._held + delta
        self._held = ""
        reasoning = content = ""
        if self._state == "opening":
            stripped = text.lstrip()
            if stripped.startswith(self.start):
                text = stripped[len(self.start):]
                self._state = "reasoning"
            elif self.start.startswith(stripped):
                # Only whitespace or a partial "<thi" so far: cannot tell yet.
                self._held = text
                return "", ""
            else:
                self._state = "reasoning"
        if self._state == "reasoning":
            index = text.find(self.end)
            if index >= 0:
                reasoning = text[:index]
                content = text[index + len(self.end):]
                self._state = "content"
            else:
                keep = _partial_suffix(text, self.end)
                reasoning = text[:len(text) - keep]
                self._held = text[len(text) - keep:]
        else:
            content = text
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush held-back text at the end of the output: it was not a marker after all."""
        text, self._held = self._held, ""
        if not text:
            return "", ""
        if self._state == "content":
            self.content += text
            return "", text
        self.reasoning += text
        return text, ""


def split(text: str, start: str = THINK_START, end: str = THINK_END) -> tuple[str, str]:
    """Whole-output split: (reasoning, content)."""
    parser = ReasoningParser(start, end)
    parser.feed(text)
    parser.finish()
    return parser.reasoning, parser.content
