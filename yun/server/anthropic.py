"""POST /v1/messages (Anthropic Messages API) and /v1/messages/count_tokens.

A translator over the chat path (yun/server/chat_pipeline.py): the request becomes a
`ChatCompletionRequest` (system prompt, text / tool_use / tool_result blocks as chat
messages, tools and tool_choice), runs through the same template, constrained decoding,
reasoning split and tool parser, and the parser's deltas become Anthropic content blocks
(`thinking`, `text`, `tool_use`) through yun/server/blocks.py, whole or as Anthropic's
event stream (message_start, content_block_start / _delta / _stop, message_delta,
message_stop). Errors use Anthropic's shape (yun/server/errors.py).

Not supported (a 400 naming the field): image and document blocks, server tools (web
search, ...), a final assistant message (prefill). `thinking.budget_tokens` is accepted
and not enforced; thinking blocks carry an empty signature.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, AsyncIterator, Literal, Union

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from yun.outputs import CompletionOutput, RequestOutput
from yun.server.blocks import Block, BlockEvent, Blocks, Closed, Delta, Opened, whole
from yun.server.chat_pipeline import ChatPipeline, PreparedChat
from yun.server.errors import APIError, bad_request
from yun.server.protocol import ChatCompletionRequest, Int64
from yun.server.serving import Slot, new_id
from yun.server.streams import SSEResponse

log = logging.getLogger("yun.server")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# ---- requests ----------------------------------------------------------------------------
class TextBlock(_Loose):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Loose):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Loose):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Loose):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Loose):
    type: Literal["redacted_thinking"]
    data: str | None = None


InputBlock = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock,
                             RedactedThinkingBlock], Field(discriminator="type")]


class InputMessage(_Loose):
    role: Literal["user", "assistant"]
    content: str | list[InputBlock]


class Tool(_Loose):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # server tools (web_search_..., ...) are refused


class ToolChoice(_Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Loose):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Int64 | None = None


class OutputFormat(_Loose):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Loose):
    effort: str | None = None
    format: OutputFormat | None = None


class CountTokensRequest(_Loose):
    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Int64
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: Int64 | None = None
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None


# ---- request -> chat request ---------------------------------------------------------------
# yun's own chat fields a client may add to a Messages request (vLLM-style extensions).
PASSED_THROUGH = ("seed", "min_tokens", "ignore_eos", "repetition_penalty", "min_p",
                  "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar", "chat_template_kwargs")

def _text(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(b.text for b in content)


def _assistant(blocks: list[Any]) -> dict[str, Any]:
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(i: int, blocks: list[Any], pending: set[str]) -> list[dict[str, Any]]:
    """Tool results become tool messages (in order), the rest user text."""
    out: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        if isinstance(b, ToolUseBlock):
            raise bad_request("tool_use blocks belong in assistant messages",
                              f"messages[{i}].content[{j}]")
        if isinstance(b, ToolResultBlock):
            if b.tool_use_id not in pending:
                raise bad_request(f"tool_result for {b.tool_use_id!r}, which no tool_use "
                                  "block of the previous assistant message has",
                                  f"messages[{i}].content[{j}].tool_use_id")
            text = _text(b.content)
            out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                        "content": f"Error: {text}" if b.is_error else text})
        elif isinstance(b, TextBlock):
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += "\n" + b.text
            else:
                out.append({"role": "user", "content": b.text})
    return out


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages; 400 for a history the API does not allow."""
    out: list[dict[str, Any]] = []
    system = _text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    pending: set[str] = set()  # tool_use ids the next user message may answer
    for i, m in enumerate(req.messages):
        blocks: list[Any] = ([TextBlock(type="text", text=m.content)]
                             if isinstance(m.content, str) else list(m.content))
        if m.role == "assistant":
            if i == len(req.messages) - 1:
                raise bad_request("the last message must be a user message (prefilling the "
                                  "assistant's reply is not supported)", f"messages[{i}]")
            out.append(_assistant(blocks))
            pending = {b.id for b in blocks if isinstance(b, ToolUseBlock)}
        else:
            out.extend(_user(i, blocks, pending))
            pending = set()
    return out


def _tool_choice(req: CountTokensRequest) -> tuple[Any, bool | None]:
    choice = req.tool_choice
    if choice is None:
        return None, None
    parallel = None if choice.disable_parallel_tool_use is None else \
        not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice of type tool needs the tool's name",
                              "tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


def to_chat_request(req: CountTokensRequest, thinks: bool) -> ChatCompletionRequest:
    for k, t in enumerate(req.tools or []):
        if t.type not in (None, "custom"):
            raise bad_request("only custom tools (name, input_schema) are supported",
                              f"tools[{k}].type")
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema}}
             for t in req.tools or []]
    choice, parallel = _tool_choice(req)
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req),
                            "tools": tools or None, "tool_choice": choice}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    if thinks and req.thinking is not None and req.thinking.type != "adaptive":
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type == "enabled"}
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    top_k=req.top_k, stop=req.stop_sequences, stream=req.stream)
        fmt = req.output_config.format if req.output_config else None
        if fmt is not None:  # structured output: constrained decoding to the schema
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt.schema_}}
        extra = req.model_extra or {}
        body.update({k: extra[k] for k in PASSED_THROUGH if k in extra})
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        raise bad_request(f"{first.get('msg', 'invalid request')}") from e


# ---- output ---------------------------------------------------------------------------------
def content_block(b: Block) -> dict[str, Any]:
    if b.kind == "thinking":
        return {"type": "thinking", "thinking": b.text, "signature": ""}
    if b.kind == "text":
        return {"type": "text", "text": b.text}
    return {"type": "tool_use", "id": b.call_id, "name": b.name, "input": b.arguments()}


def _start_block(b: Block) -> dict[str, Any]:
    if b.kind == "tool_call":
        return {"type": "tool_use", "id": b.call_id, "name": b.name, "input": {}}
    return content_block(Block(b.kind))


def _delta(b: Block, text: str) -> dict[str, Any]:
    if b.kind == "thinking":
        return {"type": "thinking_delta", "thinking": text}
    if b.kind == "text":
        return {"type": "text_delta", "text": text}
    return {"type": "input_json_delta", "partial_json": text}


def stop_reason(c: CompletionOutput, blocks: list[Block], stops: list[str]
                ) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's words."""
    if c.finish_reason == "length":
        return "max_tokens", None
    if any(b.kind == "tool_call" for b in blocks):
        return "tool_use", None
    if isinstance(c.stop_reason, str) and c.stop_reason in stops:
        return "stop_sequence", c.stop_reason
    return "end_turn", None


def event(name: str, data: dict[str, Any]) -> str:
    """One Anthropic server-sent event: `event: <type>` and its JSON."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


class AnthropicMessages:
    def __init__(self, pipeline: ChatPipeline):
        self.pipeline = pipeline
        self.serving = pipeline.serving

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, int]:
        chat = to_chat_request(req, self.pipeline.thinks)
        self.serving.check_model(chat.model)
        _, ids = await self.pipeline.render(chat)
        return {"input_tokens": len(ids)}

    async def __call__(self, req: MessagesRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        chat = to_chat_request(req, self.pipeline.thinks)
        prep = await self.pipeline.prepare(chat, new_id("msg", "_"),
                                           {"stop": "stop_sequences",
                                            "response_format": "output_config.format"},
                                           self.serving.priority(raw))
        stops = list(req.stop_sequences or [])
        slot = await self.serving.admit(raw, [prep.job], prep.job.request_id)
        if req.stream:
            return SSEResponse(self._stream(prep, stops, arrival, slot), on_close=slot.release)
        return await self.serving.respond(raw, slot, self._full(prep, stops, arrival))

    def _usage(self, out: RequestOutput, prep: PreparedChat) -> dict[str, int]:
        cached = out.num_cached_tokens
        return {"input_tokens": len(prep.job.prompt_ids) - cached,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                "output_tokens": sum(len(c.token_ids) for c in out.outputs)}

    def _message(self, prep: PreparedChat, content: list[dict[str, Any]],
                 reason: str | None, sequence: str | None, usage: dict[str, int]
                 ) -> dict[str, Any]:
        return {"id": prep.job.request_id, "type": "message", "role": "assistant",
                "model": self.serving.model_name, "content": content, "stop_reason": reason,
                "stop_sequence": sequence, "usage": usage}

    async def _full(self, prep: PreparedChat, stops: list[str], arrival: float
                    ) -> dict[str, Any]:
        (out,) = await self.serving.run_all([prep.job], arrival)
        c = out.outputs[0]
        parser = prep.new_parser()
        blocks = whole(parser.feed(c.text) + parser.finish())
        reason, sequence = stop_reason(c, blocks, stops)
        return self._message(prep, [content_block(b) for b in blocks], reason, sequence,
                             self._usage(out, prep))

    def _events(self, events: list[BlockEvent]) -> list[str]:
        sse = []
        for e in events:
            if isinstance(e, Opened):
                sse.append(event("content_block_start",
                                 {"index": e.index, "content_block": _start_block(e.block)}))
            elif isinstance(e, Delta):
                sse.append(event("content_block_delta",
                                 {"index": e.index, "delta": _delta(e.block, e.text)}))
            elif isinstance(e, Closed):
                sse.append(event("content_block_stop", {"index": e.index}))
        return sse

    async def _stream(self, prep: PreparedChat, stops: list[str], arrival: float,
                      slot: Slot) -> AsyncIterator[str]:
        """message_start (once the first output says how much of the prompt was cached),
        the blocks' events, message_delta (stop reason, usage), message_stop. Errors
        after the 200 become an `error` event."""
        parser, blocks = prep.new_parser(), Blocks()
        started, last = False, None
        try:
            async for out in self.serving.generate(prep.job, arrival):
                last, c = out, out.outputs[0]
                if not started:
                    started = True
                    usage = {**self._usage(out, prep), "output_tokens": 0}
                    yield event("message_start", {"message": self._message(
                        prep, [], None, None, usage)})
                new = c.text  # a delta
                deltas = parser.feed(new) if new else []
                if c.finished:
                    deltas += parser.finish()
                for text in self._events(blocks.feed(deltas)):
                    yield text
            if last is None:
                raise APIError(503, "the engine stopped before the request finished")
            for text in self._events(blocks.close()):
                yield text
            reason, sequence = stop_reason(last.outputs[0], blocks.blocks, stops)
            yield event("message_delta", {"delta": {"stop_reason": reason,
                                                    "stop_sequence": sequence},
                                          "usage": self._usage(prep.job.total or last, prep)})
            yield event("message_stop", {})
        except APIError as e:
            yield event("error", {"error": e.anthropic_body()["error"]})
        except Exception as e:  # a bug: still end the stream with an error event
            log.exception("error while streaming a message")
            yield event("error", {"error": APIError(500, f"internal error: {type(e).__name__}")
                                  .anthropic_body()["error"]})
        finally:
            slot.release()
