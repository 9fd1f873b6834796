"""Tool-call parsers: a model's raw output -> OpenAI `tool_calls` and the text around them.

Each parser is a streaming state machine over the answer text: `feed(text)` returns the
events it can already tell (content text, or a `ToolCallDelta`), `finish()` the rest. A
call is announced (id, name) as soon as its name is complete; its arguments then stream
as a growing prefix of the final arguments string, so the deltas of a stream always
reassemble to the non-streamed message (which is the same machine fed all at once).

Formats, chosen from the chat template (or `--tool-call-parser`):
- hermes (Qwen2.5, Qwen3, QwQ, Hermes): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>` blocks;
- deepseek_v3: `<｜tool▁calls▁begin｜>` then per call `<｜tool▁call▁begin｜>function<｜tool▁sep｜>
  NAME\n```json\nARGS\n```<｜tool▁call▁end｜>` (V3, R1) or `<｜tool▁call▁begin｜>NAME
  <｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` (V3.1);
and, for `tool_choice` "required" / a named function (constrained to plain JSON whatever
the model): `[{"name": ..., "arguments": {...}}, ...]` / the arguments object alone.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Union

from yun.server.reasoning import Trimmed, partial_suffix


@dataclass
class ToolCallDelta:
    """A piece of call `index`: the first carries id and name, later ones only arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_dict(self) -> dict:
        d: dict = {"index": self.index}
        fn: dict = {}
        if self.id is not None:
            d["id"], d["type"] = self.id, "function"
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        d["function"] = fn
        return d


Event = Union[str, ToolCallDelta]  # content text, or a piece of a call


def emit_arguments(out: list[ToolCallDelta], index: int, args: str, sent: int) -> int:
    """Stream the part of a call's arguments `args` not sent yet (`sent` characters were):
    onto the delta this step already opened, or as a new one. Returns the new `sent`."""
    if len(args) > sent:
        if out:
            out[-1].arguments = args[sent:]
        else:
            out.append(ToolCallDelta(index, arguments=args[sent:]))
    return max(sent, len(args))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ObjectScan:
    """Incremental scan of one JSON object's text: where each top-level value starts and
    ends (`fields[key] = [start, end or None]`), without parsing the values."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.depth = 0
        self.in_str = self.esc = False
        self.expect = "open"  # open, key, key_str, colon, value, str_value, nested, scalar, comma
        self.key_start = 0
        self.key: str | None = None
        self.fields: dict[str, list[int | None]] = {}
        self.end: int | None = None  # offset just past the closing brace

    def feed(self, text: str) -> str:
        """Scan more text; returns what came after the object's end (if it ended)."""
        self.text += text
        if self.end is None:
            self._scan()
        return self.text[self.end:] if self.end is not None else ""

    def _value(self, start: int) -> None:
        if self.key is not None:
            self.fields[self.key] = [start, None]

    def _close(self, end: int) -> None:
        if self.key is not None and self.key in self.fields:
            self.fields[self.key][1] = end
        self.key, self.expect = None, "comma"

    def _scan(self) -> None:  # noqa: C901 - one small state machine
        text, i = self.text, self.pos
        while i < len(text):
            c = text[i]
            i += 1
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 1 and self.expect == "key_str":
                        try:
                            self.key = json.loads(text[self.key_start:i])
                        except ValueError:
                            self.key = None
                        self.expect = "colon"
                    elif self.depth == 1 and self.expect == "str_value":
                        self._close(i)
                continue
            if self.expect == "open":
                if c == "{":
                    self.depth, self.expect = 1, "key"
                continue
            if c == '"':
                self.in_str = True
                if self.depth == 1 and self.expect == "key":
                    self.key_start, self.expect = i - 1, "key_str"
                elif self.depth == 1 and self.expect == "value":
                    self._value(i - 1)
                    self.expect = "str_value"
            elif c in "{[":
                if self.depth == 1 and self.expect == "value":
                    self._value(i - 1)
                    self.expect = "nested"
                self.depth += 1
            elif c in "}]":
                if self.depth == 1 and self.expect == "scalar":
                    self._close(i - 1)
                self.depth -= 1
                if self.depth == 1 and self.expect == "nested":
                    self._close(i)
                elif self.depth == 0:
                    self.end = i
                    break
            elif self.depth == 1:
                if self.expect == "colon" and c == ":":
                    self.expect = "value"
                elif self.expect == "value" and not c.isspace():
                    self._value(i - 1)
                    self.expect = "scalar"
                elif self.expect == "scalar" and (c == "," or c.isspace()):
                    self._close(i - 1)
                    self.expect = "key" if c == "," else "comma"
                elif self.expect == "comma" and c == ",":
                    self.expect = "key"
        self.pos = i

    def raw(self, key: str) -> tuple[str, bool] | None:
        """The value's text so far and whether it is complete; None if the key is unseen."""
        span = self.fields.get(key)
        if span is None:
            return None
        start, end = span
        return self.text[start:end if end is not None else len(self.text)], end is not None


class JsonCall:
    """One call written as a JSON object `{"name": ..., "arguments": ...}` ("parameters"
    also accepted); arguments given as a JSON string are unwrapped."""

    def __init__(self, index: int):
        self.index = index
        self.scan = ObjectScan()
        self.name: str | None = None
        self.sent = 0

    def feed(self, text: str) -> str:
        return self.scan.feed(text)

    def arguments(self, final: bool) -> str:
        got = self.scan.raw("arguments") or self.scan.raw("parameters")
        if got is None:
            return "{}" if final else ""
        raw, complete = got
        if raw.startswith(("{", "[")):
            return raw  # an unfinished object only grows: stream it as it comes
        if not complete:
            return raw if final else ""
        if raw.startswith('"'):
            try:
                value = json.loads(raw)
                return value if isinstance(value, str) else raw
            except ValueError:
                return raw
        return raw

    def events(self, final: bool) -> list[Event]:
        out: list[Event] = []
        if self.name is None:
            got = self.scan.raw("name")
            if got is not None and got[1]:
                try:
                    name = json.loads(got[0])
                except ValueError:
                    name = None
                if isinstance(name, str) and name:
                    self.name = name
                    out.append(ToolCallDelta(self.index, new_call_id(), name))
        if self.name is None:
            return out
        args = self.arguments(final)
        self.sent = emit_arguments(out, self.index, args, self.sent)
        return out


class ToolParser:
    """Base: content text passes through with trailing whitespace held back (dropped at
    the end); subclasses find the calls. `num_calls` counts the calls announced.
    `markers`: the tags of the format (if the tokenizer makes them special tokens, the
    server keeps special tokens in the text)."""

    markers: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.buf = ""
        self.num_calls = 0
        self.content = Trimmed()
        self.content.started = True  # keep leading whitespace; only the end is trimmed

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._merge(self._run(final=False))

    def finish(self) -> list[Event]:
        return self._merge(self._run(final=True))

    def _run(self, final: bool) -> list[Event]:
        raise NotImplementedError

    def _cut(self, end: str, final: bool) -> tuple[str, str, bool]:
        """Take the buffer up to the `end` marker: (text before it, the marker if found,
        whether the block closed). Unclosed, the tail that may start `end` stays."""
        i = self.buf.find(end)
        if i >= 0:
            piece, self.buf = self.buf[:i], self.buf[i + len(end):]
            return piece, end, True
        keep = 0 if final else partial_suffix(self.buf, end)
        piece, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return piece, "", final

    def _text(self, text: str) -> list[Event]:
        out = self.content.push(text)
        return [out] if out else []

    @staticmethod
    def _merge(events: list[Event]) -> list[Event]:
        merged: list[Event] = []
        for e in events:
            if isinstance(e, str) and merged and isinstance(merged[-1], str):
                merged[-1] += e
            else:
                merged.append(e)
        return merged


class HermesToolParser(ToolParser):
    """`<tool_call>{json}</tool_call>` blocks anywhere in the answer."""

    start, end = "<tool_call>", "</tool_call>"
    markers = (start, end)

    def __init__(self) -> None:
        super().__init__()
        self.call: JsonCall | None = None
        self.body = ""  # the current block's text, given back as content if it names no call

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            if self.call is None:
                i = self.buf.find(self.start)
                if i < 0:
                    keep = 0 if final else partial_suffix(self.buf, self.start)
                    out += self._text(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                out += self._text(self.buf[:i])
                self.buf = self.buf[i + len(self.start):]
                self.call, self.body = JsonCall(self.num_calls), ""
                continue
            piece, tag, closed = self._cut(self.end, final)
            self.body += piece
            self.call.feed(piece)
            out += self.call.events(final=closed)
            if not closed:
                return out
            if self.call.name is None:  # not a call after all: the block is plain text
                out += self._text(self.start + self.body + tag)
            else:
                self.num_calls += 1
            self.call = None


class DeepSeekV3ToolParser(ToolParser):
    """DeepSeek's tool tokens; V3 / R1 (`function<sep>NAME\\n```json ARGS```) and V3.1
    (`NAME<sep>ARGS`) call bodies are told apart by what precedes the separator."""

    calls_begin, calls_end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    markers = (calls_begin, calls_end, call_begin, call_end, sep)
    _fence = re.compile(r"[^\S\n]*\n?\s*```[a-zA-Z]*[^\S\n]*\n?")

    def __init__(self) -> None:
        super().__init__()
        self.state = "text"  # text, calls (between calls), call (inside one)
        self.rest = ""  # the current call's text after call_begin
        self.name: str | None = None
        self.sent = 0

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            if self.state == "text":
                hits = [(self.buf.find(m), m) for m in (self.calls_begin, self.call_begin)]
                hits = [h for h in hits if h[0] >= 0]
                if not hits:
                    keep = 0 if final else max(partial_suffix(self.buf, self.calls_begin),
                                               partial_suffix(self.buf, self.call_begin))
                    out += self._text(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                i, marker = min(hits)
                out += self._text(self.buf[:i])
                self.buf = self.buf[i + len(marker):]
                self.state = "calls" if marker == self.calls_begin else "call"
                self.rest, self.name, self.sent = "", None, 0
                continue
            if self.state == "calls":
                head = self.buf.lstrip()
                if head.startswith(self.call_begin):
                    self.buf, self.state = head[len(self.call_begin):], "call"
                    self.rest, self.name, self.sent = "", None, 0
                elif head.startswith(self.calls_end):
                    self.buf, self.state = head[len(self.calls_end):], "text"
                elif not final and (self.call_begin.startswith(head)
                                    or self.calls_end.startswith(head)):
                    return out
                else:
                    self.state = "text"  # stray text after the calls: content again
                continue
            piece, tag, closed = self._cut(self.call_end, final)
            self.rest += piece
            out += self._call_events(closed)
            if not closed:
                return out
            if self.name is None:  # not a call after all: plain text
                out += self._text(self.call_begin + self.rest + tag)
            else:
                self.num_calls += 1
            self.state = "calls"

    def _split(self, final: bool) -> tuple[str | None, str, bool]:
        """(name, arguments so far, arguments complete) of the current call."""
        head, sep, body = self.rest.partition(self.sep)
        if not sep:
            return None, "", False
        if head.strip() != "function":  # V3.1: NAME<sep>ARGS
            args = body.strip() if final else body.lstrip()
            return head.strip() or None, args if final else args.rstrip(), final
        name, newline, after = body.partition("\n")  # V3: function<sep>NAME\n```json ...```
        if not newline and not final:
            return None, "", False
        m = self._fence.match(after)
        args = after[m.end():] if m else after
        close = args.find("```")
        if close >= 0:
            return name.strip() or None, args[:close].strip(), True
        if final:
            return name.strip() or None, args.strip(), True
        return name.strip() or None, args.lstrip().rstrip(" \t\n`"), False

    def _call_events(self, final: bool) -> list[Event]:
        name, args, _ = self._split(final)
        out: list[Event] = []
        if self.name is None and name is not None:
            self.name = name
            out.append(ToolCallDelta(self.num_calls, new_call_id(), name))
        if self.name is not None:
            self.sent = emit_arguments(out, self.num_calls, args, self.sent)
        return out


class JsonArrayToolParser(ToolParser):
    """tool_choice "required": the output is constrained to `[{"name", "arguments"}, ...]`."""

    def __init__(self) -> None:
        super().__init__()
        self.call: JsonCall | None = None

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            if self.call is None:
                i = self.buf.find("{")
                if i < 0:
                    self.buf = ""
                    return out
                self.buf = self.buf[i:]
                self.call = JsonCall(self.num_calls)
            rest = self.call.feed(self.buf)
            self.buf = ""
            done = self.call.scan.end is not None
            out += self.call.events(final=done or final)
            if not done:
                return out
            if self.call.name is not None:
                self.num_calls += 1
            self.call, self.buf = None, rest


class NamedToolParser(ToolParser):
    """tool_choice naming a function: the output is constrained to its arguments."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        if self.num_calls == 0 and (self.buf or final):
            out.append(ToolCallDelta(0, new_call_id(), self.name))
            self.num_calls = 1
        if self.buf:
            if out:
                out[-1].arguments = self.buf
            else:
                out.append(ToolCallDelta(0, arguments=self.buf))
            self.buf = ""
        return out


ToolParserFactory = Callable[[], ToolParser]

TOOL_PARSERS: dict[str, ToolParserFactory] = {
    "hermes": HermesToolParser, "qwen": HermesToolParser,
    "deepseek_v3": DeepSeekV3ToolParser, "deepseek_v31": DeepSeekV3ToolParser}
TOOL_PARSER_CHOICES = ("auto", "none", *TOOL_PARSERS)


def resolve_tool_parser(setting: str, chat_template: str | None) -> ToolParserFactory | None:
    """The parser for this model: `setting` by name, or for "auto" the format the chat
    template writes tool calls in. None: the template has no format we know."""
    if setting == "none":
        return None
    if setting != "auto":
        return TOOL_PARSERS[setting]
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesToolParser
    if DeepSeekV3ToolParser.call_begin in template:
        return DeepSeekV3ToolParser
    return None
