"""Reasoning parsers: split a thinking model's output into reasoning and answer.

Models that think (DeepSeek-R1 and its distills, Qwen3, QwQ, DeepSeek-V3.1 in thinking
mode) write `<think> reasoning </think> answer`. The parser is a streaming state machine:
`feed(text)` takes each new piece of output and returns what it can already tell apart,
`finish()` flushes the rest; the whole output fed at once gives exactly the same split as
piece by piece, so a streamed message reassembles to the non-streamed one.

Chat templates of R1 distills (and thinking-mode QwQ / DeepSeek-V3.1) end the prompt
with `<think>\\n`, so the model only writes the closing tag: `starts_inside(prompt)`
detects that and the parser then starts in the reasoning.
"""

from __future__ import annotations

from typing import Callable

Split = tuple[str, str]  # (reasoning delta, content delta)


class Trimmed:
    """A text stream with leading whitespace dropped and trailing whitespace held back
    until more text follows it (dropped at the end): the stream of `text.strip()`."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body):]
        return out


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that starts `marker` (may complete later)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ThinkParser:
    """`<think>...</think>` (tags configurable). Reasoning and answer are each stripped of
    surrounding whitespace. `reasoning_end` is the offset in the raw output just past the
    reasoning (0 if there was none), for counting reasoning tokens."""

    start_tag = "<think>"
    end_tag = "</think>"
    markers = (start_tag, end_tag)

    def __init__(self, start_inside: bool = False):
        self.state = "open"  # "open" (a start tag may come), "reasoning", "content"
        self.inside = start_inside
        self.buf = ""
        self.fed = 0
        self.reasoning_end = 0
        self.reasoning, self.content = Trimmed(), Trimmed()

    @classmethod
    def starts_inside(cls, prompt: str | None) -> bool:
        """Whether the rendered prompt leaves the model inside an open reasoning block."""
        return bool(prompt) and prompt.rstrip().endswith(cls.start_tag)

    def feed(self, text: str) -> Split:
        self.buf += text
        self.fed += len(text)
        return self._run(final=False)

    def finish(self) -> Split:
        return self._run(final=True)

    def _run(self, final: bool) -> Split:
        r, c = "", ""
        while True:
            if self.state == "open":
                head = self.buf.lstrip()
                if head.startswith(self.start_tag):
                    self.buf, self.state = head[len(self.start_tag):], "reasoning"
                    continue
                if self.start_tag.startswith(head) and not final:
                    return r, c  # could still become the start tag
                self.state = "reasoning" if self.inside else "content"
                continue
            if self.state == "reasoning":
                i = self.buf.find(self.end_tag)
                if i < 0:
                    keep = 0 if final else partial_suffix(self.buf, self.end_tag)
                    r += self.reasoning.push(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    if final:
                        self.reasoning_end = self.fed
                    return r, c
                r += self.reasoning.push(self.buf[:i])
                self.buf = self.buf[i + len(self.end_tag):]
                self.reasoning_end = self.fed - len(self.buf)
                self.state = "content"
                continue
            c += self.content.push(self.buf)
            self.buf = ""
            return r, c


ReasoningParserFactory = Callable[[bool], ThinkParser]

# name -> parser; "deepseek_r1" and "qwen3" are the names vLLM users know.
REASONING_PARSERS: dict[str, ReasoningParserFactory] = {
    "think": ThinkParser, "deepseek_r1": ThinkParser, "qwen3": ThinkParser}
REASONING_PARSER_CHOICES = ("auto", "none", *REASONING_PARSERS)


def resolve_reasoning_parser(setting: str, chat_template: str | None
                             ) -> ReasoningParserFactory | None:
    """The parser for this model: `setting` by name, or for "auto" the one whose tags the
    chat template uses (a template that mentions `<think>` has a thinking model)."""
    if setting == "none":
        return None
    if setting != "auto":
        return REASONING_PARSERS[setting]
    if chat_template and ThinkParser.end_tag in chat_template:
        return ThinkParser
    return None
