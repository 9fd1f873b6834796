"""One chat choice's output -> the assistant message: reasoning, content and tool calls.

The raw text goes through the reasoning parser (if the model thinks), whose answer part
goes through the tool parser (if tools are on). `feed` / `finish` give the stream's delta
dicts in order; `parse` feeds the whole text at once and assembles the same deltas, so a
stream always reassembles to the non-streamed message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from yun.server.reasoning import ThinkParser, partial_suffix
from yun.server.tool_parsers import ToolCallDelta, ToolParser


@dataclass
class ParsedMessage:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class MessageParser:
    """`drop_end`: texts to remove from the very end of the output (the EOS token's, when
    special tokens are kept in the text because the format's tags are special tokens)."""

    def __init__(self, reasoning: ThinkParser | None = None, tools: ToolParser | None = None,
                 max_calls: int | None = None, drop_end: tuple[str, ...] = ()):
        self.reasoning = reasoning
        self.tools = tools
        self.max_calls = max_calls  # 1 when parallel_tool_calls is false
        self.drop_end = tuple(d for d in drop_end if d)
        self.tail = ""  # held back: it may be the start of a text in drop_end

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    @property
    def num_calls(self) -> int:
        n = self.tools.num_calls if self.tools is not None else 0
        return n if self.max_calls is None else min(n, self.max_calls)

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(text, final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas("", final=True)

    def _held(self, text: str, final: bool) -> str:
        """`text` minus a tail that may yet turn out to end the output with a drop_end."""
        if not self.drop_end:
            return text
        text, self.tail = self.tail + text, ""
        if final:
            end = next((d for d in self.drop_end if text.endswith(d)), "")
            return text[:len(text) - len(end)]
        keep = max(max((partial_suffix(text, d) for d in self.drop_end), default=0),
                   max((len(d) for d in self.drop_end if text.endswith(d)), default=0))
        self.tail = text[len(text) - keep:]
        return text[:len(text) - keep]

    def _deltas(self, text: str, final: bool) -> list[dict[str, Any]]:
        text = self._held(text, final)
        if self.reasoning is not None:
            reasoning, answer = self.reasoning.feed(text) if text else ("", "")
            if final:
                more = self.reasoning.finish()
                reasoning, answer = reasoning + more[0], answer + more[1]
        else:
            reasoning, answer = "", text
        out: list[dict[str, Any]] = []
        if reasoning:
            out.append({"reasoning_content": reasoning})
        if self.tools is None:
            if answer:
                out.append({"content": answer})
            return out
        events = self.tools.feed(answer)
        if final:
            events += self.tools.finish()
        for e in events:
            if isinstance(e, ToolCallDelta):
                if self.max_calls is not None and e.index >= self.max_calls:
                    continue  # parallel_tool_calls: false keeps the first call only
                if out and "tool_calls" in out[-1]:
                    out[-1]["tool_calls"].append(e.as_dict())
                else:
                    out.append({"tool_calls": [e.as_dict()]})
            elif out and "content" in out[-1]:
                out[-1]["content"] += e
            else:
                out.append({"content": e})
        return out

    def parse(self, text: str) -> ParsedMessage:
        return assemble(self.feed(text) + self.finish())


def assemble(deltas: list[dict[str, Any]]) -> ParsedMessage:
    """Reassemble stream deltas into one message (the way OpenAI clients do). Content is
    null when the model only called tools or only reasoned."""
    content, thought = "", ""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        content += d.get("content") or ""
        thought += d.get("reasoning_content") or ""
        for tc in d.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                  "function": {"name": None, "arguments": ""}})
            if tc.get("id"):
                call["id"] = tc["id"]
                call["function"]["name"] = tc["function"]["name"]
            call["function"]["arguments"] += tc["function"].get("arguments") or ""
    tool_calls = [calls[i] for i in sorted(calls)]
    return ParsedMessage(content=content if content or not (tool_calls or thought) else None,
                         reasoning_content=thought or None, tool_calls=tool_calls)
