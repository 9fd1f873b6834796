"""A chat choice's parser deltas -> a sequence of content blocks (thinking, text, tool call).

The Anthropic Messages and OpenAI Responses APIs both return an assistant turn as a list
of typed blocks (items) and stream each block as start / deltas / stop. `Blocks` turns the
chat parser's deltas (`{"reasoning_content"}`, `{"content"}`, `{"tool_calls": [...]}`,
see yun/server/parsing.py) into those events: a block opens when the kind of delta
changes (or a new tool call starts) and closes when the next one opens or at the end.
Whole responses are built by feeding every delta at once and keeping the blocks, so a
stream always reassembles to the non-streamed content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

BlockKind = Literal["thinking", "text", "tool_call"]


@dataclass
class Block:
    kind: BlockKind
    text: str = ""  # the thinking, the text, or the call's arguments (JSON text)
    call_id: str | None = None  # tool_call only
    name: str | None = None  # tool_call only

    def arguments(self) -> dict[str, Any]:
        """The call's arguments as an object ({} if the text is not one, e.g. cut off)."""
        try:
            value = json.loads(self.text or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class Opened:
    index: int
    block: Block


@dataclass
class Delta:
    index: int
    block: Block
    text: str


@dataclass
class Closed:
    index: int
    block: Block


BlockEvent = Opened | Delta | Closed


class Blocks:
    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.open: int | None = None  # index of the block being written
        self.calls: dict[int, int] = {}  # tool-call index -> block index

    def feed(self, deltas: list[dict[str, Any]]) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        for d in deltas:
            if d.get("reasoning_content"):
                self._text("thinking", d["reasoning_content"], events)
            if d.get("content"):
                self._text("text", d["content"], events)
            for tc in d.get("tool_calls") or []:
                self._call(tc, events)
        return events

    def close(self) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        self._close(events)
        return events

    def _close(self, events: list[BlockEvent]) -> None:
        if self.open is not None:
            events.append(Closed(self.open, self.blocks[self.open]))
            self.open = None

    def _start(self, block: Block, events: list[BlockEvent]) -> int:
        self._close(events)
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        events.append(Opened(self.open, block))
        return self.open

    def _text(self, kind: BlockKind, text: str, events: list[BlockEvent]) -> None:
        if self.open is None or self.blocks[self.open].kind != kind:
            self._start(Block(kind), events)
        block = self.blocks[self.open]  # type: ignore[index]
        block.text += text
        events.append(Delta(self.open, block, text))  # type: ignore[arg-type]

    def _call(self, tc: dict[str, Any], events: list[BlockEvent]) -> None:
        fn = tc.get("function") or {}
        if tc.get("id"):
            self.calls[tc["index"]] = self._start(
                Block("tool_call", call_id=tc["id"], name=fn.get("name")), events)
        i = self.calls.get(tc["index"])
        args = fn.get("arguments") or ""
        if i is None or not args:
            return
        self.blocks[i].text += args
        events.append(Delta(i, self.blocks[i], args))


def whole(deltas: list[dict[str, Any]]) -> list[Block]:
    """The blocks of a whole output (what a stream of the same deltas reassembles to)."""
    b = Blocks()
    b.feed(deltas)
    return b.blocks
