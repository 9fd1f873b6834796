"""POST /v1/responses (OpenAI Responses API), GET and DELETE /v1/responses/{id}.

A translator over the chat path (yun/server/chat_pipeline.py): `instructions` and the
`input` items (messages, `function_call`, `function_call_output`) become chat messages;
function tools, `tool_choice`, `text.format` (json_schema / json_object, enforced by
constrained decoding) and `max_output_tokens` map to their chat fields. The parser's
deltas become output items through yun/server/blocks.py: `reasoning` (thinking models:
the reasoning as `reasoning_text` content, and as a summary when `reasoning.summary` is
set), `message` (output_text) and `function_call`, whole or as the typed event stream
(response.created, response.output_item.added, response.output_text.delta,
response.function_call_arguments.delta, ..., response.completed).

`store` (default true) keeps each response and the conversation that led to it in a
bounded in-memory store (least recently used dropped first; lost on restart), so
`previous_response_id` continues a conversation and GET / DELETE find it by id.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Annotated, Any, AsyncIterator, Literal, Union

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from yun.outputs import RequestOutput
from yun.server.blocks import Block, BlockEvent, Blocks, Closed, Delta, Opened, whole
from yun.server.chat_pipeline import ChatPipeline, PreparedChat
from yun.server.errors import APIError, bad_request
from yun.server.parsing import MessageParser
from yun.server.protocol import ChatCompletionRequest, Int64
from yun.server.serving import Slot, new_id
from yun.server.streams import SSEResponse

log = logging.getLogger("yun.server")

STORE_SIZE = 1024  # responses kept for previous_response_id / GET (least recently used out)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# ---- requests ----------------------------------------------------------------------------
class TextPart(_Loose):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Loose):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]


class FunctionCallItem(_Loose):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Loose):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[TextPart]


class ReasoningItem(_Loose):
    type: Literal["reasoning"]


def _item_kind(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("type", "message")
    return getattr(v, "type", "message")


InputItem = Annotated[Union[
    Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
    Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Annotated[ReasoningItem, Tag("reasoning")]], Discriminator(_item_kind)]


class FunctionTool(_Loose):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Loose):
    type: Literal["function"]
    name: str


class TextFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Loose):
    format: TextFormat | None = None


class ReasoningConfig(_Loose):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Loose):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None


# ---- request -> chat messages --------------------------------------------------------------
def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """The input items as chat messages (consecutive function calls: one assistant turn);
    400 for a function_call_output that answers no call."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            calls.add(item.call_id)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise bad_request(f"function_call_output for {item.call_id!r}, which no "
                                  "earlier function_call has", f"input[{i}].call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output)})
    return out


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the assistant's chat turn(s) (reasoning left out)."""
    items: list[Any] = []
    for o in output:
        if o["type"] == "message":
            items.append(MessageItem(role="assistant", content="".join(
                p.get("text", "") for p in o["content"])))
        elif o["type"] == "function_call":
            items.append(FunctionCallItem(type="function_call", call_id=o["call_id"],
                                          name=o["name"], arguments=o["arguments"]))
    return input_messages(items)


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise bad_request("text.format of type json_schema needs a schema", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "output",
                                                   "schema": fmt.schema_}}


def to_chat_request(req: ResponsesRequest, history: list[dict[str, Any]],
                    thinks: bool) -> ChatCompletionRequest:
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else [])
    messages += history + input_messages(req.input)
    choice: Any = req.tool_choice
    if isinstance(choice, NamedFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    tools = [{"type": "function", "function": t.model_dump(
        include={"name", "description", "parameters"}, exclude_none=True)}
             for t in req.tools or []]
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "tools": tools or None,
        "tool_choice": choice, "max_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p,
        "response_format": _response_format(req.text)}
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    effort = req.reasoning.effort if req.reasoning else None
    if thinks and effort is not None:
        body["chat_template_kwargs"] = {"enable_thinking": effort != "none",
                                        "reasoning_effort": effort}
    extra = req.model_extra or {}
    body.update({k: extra[k] for k in PASSED_THROUGH if k in extra})
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise bad_request(str(e.errors()[0].get("msg", "invalid request")),
                          "input") from e


# yun's own chat fields a client may add (vLLM-style extensions, in extra_body).
PASSED_THROUGH = ("seed", "top_k", "min_p", "min_tokens", "ignore_eos", "repetition_penalty",
                  "stop", "structured_outputs", "guided_json", "guided_regex",
                  "guided_choice", "guided_grammar", "chat_template_kwargs")


CHAT_NAMES = {"max_tokens": "max_output_tokens", "messages": "input",
              "response_format": "text.format"}


# ---- the store -------------------------------------------------------------------------------
class ResponseStore:
    """Responses by id with the conversation they ended (for previous_response_id): at most
    `size`, the least recently used dropped first. In memory, one process."""

    def __init__(self, size: int = STORE_SIZE):
        self.size = size
        self.items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        self.items[response["id"]] = (response, conversation)
        self.items.move_to_end(response["id"])
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, rid: str, param: str | None = None
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if rid not in self.items:
            raise APIError(404, f"no stored response with id {rid!r} (responses are kept in "
                           f"memory, the {self.size} most recently used)", param=param,
                           code="response_not_found")
        self.items.move_to_end(rid)
        return self.items[rid]

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self.items[rid]


# ---- output ---------------------------------------------------------------------------------
class _Ids:
    """Item ids per block index (fixed once drawn, so stream and store agree)."""

    def __init__(self) -> None:
        self.ids: dict[int, str] = {}

    def __call__(self, index: int, block: Block) -> str:
        if index not in self.ids:
            prefix = {"thinking": "rs", "text": "msg", "tool_call": "fc"}[block.kind]
            self.ids[index] = new_id(prefix, "_")
        return self.ids[index]


def output_item(block: Block, item_id: str, summary: bool, done: bool = True
                ) -> dict[str, Any]:
    status = "completed" if done else "in_progress"
    text = block.text if done else ""
    if block.kind == "thinking":
        item = {"type": "reasoning", "id": item_id, "status": status,
                "summary": [{"type": "summary_text", "text": text}] if summary and done else [],
                "content": [{"type": "reasoning_text", "text": text}] if done else []}
        return item
    if block.kind == "text":
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [_text_part(text)] if done else []}
    return {"type": "function_call", "id": item_id, "call_id": block.call_id,
            "name": block.name, "arguments": text, "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _part(block: Block, text: str) -> dict[str, Any]:
    return _text_part(text) if block.kind == "text" else {"type": "reasoning_text", "text": text}


class Responses:
    def __init__(self, pipeline: ChatPipeline, store: ResponseStore | None = None):
        self.pipeline = pipeline
        self.serving = pipeline.serving
        self.store = store or ResponseStore()

    # ---- GET / DELETE ------------------------------------------------------------------------
    def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.store.get(response_id)[0]

    def delete(self, response_id: str) -> dict[str, Any]:
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    # ---- POST ----------------------------------------------------------------------------------
    async def __call__(self, req: ResponsesRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            history = self.store.get(req.previous_response_id, "previous_response_id")[1]
        chat = to_chat_request(req, history, self.pipeline.thinks)
        rid = new_id("resp", "_")
        prep = await self.pipeline.prepare(chat, rid, CHAT_NAMES, self.serving.priority(raw))
        conversation = history + input_messages(req.input)
        slot = await self.serving.admit(raw, [prep.job], prep.job.request_id)
        if req.stream:
            return SSEResponse(self._stream(req, prep, conversation, arrival, slot),
                               on_close=slot.release)
        return await self.serving.respond(raw, slot,
                                          self._full(req, prep, conversation, arrival))

    def _response(self, req: ResponsesRequest, prep: PreparedChat, status: str,
                  output: list[dict[str, Any]], usage: dict[str, Any] | None,
                  created: float) -> dict[str, Any]:
        params = prep.job.params
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) \
            if req.text and req.text.format else {"type": "text"}
        choice = req.tool_choice
        return {
            "id": prep.job.request_id, "object": "response", "created_at": int(created),
            "status": status, "error": None,
            "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                                   else None),
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.serving.model_name, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump() if req.reasoning else
            {"effort": None, "summary": None},
            "store": req.store is not False, "temperature": params.temperature,
            "text": {"format": fmt},
            "tool_choice": choice.model_dump() if isinstance(choice, BaseModel)
            else (choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": params.top_p, "truncation": "disabled", "usage": usage,
            "metadata": req.metadata or {}}

    def _usage(self, out: RequestOutput, prep: PreparedChat,
               parser: MessageParser) -> dict[str, Any]:
        u = self.pipeline.usage(out, prep.job, [parser])
        return {"input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": (
                    u.completion_tokens_details or {}).get("reasoning_tokens", 0)},
                "total_tokens": u.total_tokens}

    def _finished(self, req: ResponsesRequest, prep: PreparedChat, out: RequestOutput,
                  parser: MessageParser, blocks: list[Block], ids: _Ids,
                  conversation: list[dict[str, Any]], created: float) -> dict[str, Any]:
        summary = bool(req.reasoning and req.reasoning.summary)
        output = [output_item(b, ids(i, b), summary) for i, b in enumerate(blocks)]
        status = "incomplete" if out.outputs[0].finish_reason == "length" else "completed"
        resp = self._response(req, prep, status, output, self._usage(out, prep, parser),
                              created)
        if req.store is not False:
            self.store.put(resp, conversation + output_messages(output))
        return resp

    async def _full(self, req: ResponsesRequest, prep: PreparedChat,
                    conversation: list[dict[str, Any]], arrival: float) -> dict[str, Any]:
        created = time.time()
        (out,) = await self.serving.run_all([prep.job], arrival)
        parser = prep.new_parser()
        blocks = whole(parser.feed(out.outputs[0].text) + parser.finish())
        return self._finished(req, prep, out, parser, blocks, _Ids(), conversation, created)

    async def _stream(self, req: ResponsesRequest, prep: PreparedChat,
                      conversation: list[dict[str, Any]], arrival: float,
                      slot: Slot) -> AsyncIterator[str]:
        created, seq = time.time(), 0
        parser, blocks, ids = prep.new_parser(), Blocks(), _Ids()
        summary = bool(req.reasoning and req.reasoning.summary)

        def ev(kind: str, **data: Any) -> str:
            nonlocal seq
            seq += 1
            body = json.dumps({"type": kind, "sequence_number": seq - 1, **data},
                              ensure_ascii=False)
            return f"event: {kind}\ndata: {body}\n\n"

        def render(events: list[BlockEvent]) -> list[str]:
            sse = []
            for e in events:
                iid, b = ids(e.index, e.block), e.block
                at = {"item_id": iid, "output_index": e.index}
                if isinstance(e, Opened):
                    sse.append(ev("response.output_item.added", output_index=e.index,
                                  item=output_item(b, iid, summary, done=False)))
                    if b.kind != "tool_call":
                        sse.append(ev("response.content_part.added", **at, content_index=0,
                                      part=_part(b, "")))
                elif isinstance(e, Delta):
                    if b.kind == "text":
                        sse.append(ev("response.output_text.delta", **at, content_index=0,
                                      delta=e.text, logprobs=[]))
                    elif b.kind == "thinking":
                        sse.append(ev("response.reasoning_text.delta", **at, content_index=0,
                                      delta=e.text))
                    else:
                        sse.append(ev("response.function_call_arguments.delta", **at,
                                      delta=e.text))
                elif isinstance(e, Closed):
                    if b.kind == "text":
                        sse.append(ev("response.output_text.done", **at, content_index=0,
                                      text=b.text, logprobs=[]))
                    elif b.kind == "thinking":
                        sse.append(ev("response.reasoning_text.done", **at, content_index=0,
                                      text=b.text))
                    else:
                        sse.append(ev("response.function_call_arguments.done", **at,
                                      name=b.name, arguments=b.text))
                    if b.kind != "tool_call":
                        sse.append(ev("response.content_part.done", **at, content_index=0,
                                      part=_part(b, b.text)))
                    sse.append(ev("response.output_item.done", output_index=e.index,
                                  item=output_item(b, iid, summary)))
            return sse

        try:
            snapshot = self._response(req, prep, "in_progress", [], None, created)
            yield ev("response.created", response=snapshot)
            yield ev("response.in_progress", response=snapshot)
            last = None
            async for out in self.serving.generate(prep.job, arrival):
                last, c = out, out.outputs[0]
                new = c.text  # a delta
                deltas = parser.feed(new) if new else []
                if c.finished:
                    deltas += parser.finish()
                for text in render(blocks.feed(deltas)):
                    yield text
            if last is None:
                raise APIError(503, "the engine stopped before the request finished")
            for text in render(blocks.close()):
                yield text
            resp = self._finished(req, prep, prep.job.total or last, parser, blocks.blocks,
                                  ids, conversation, created)
            kind = "response.completed" if resp["status"] == "completed" else \
                "response.incomplete"
            yield ev(kind, response=resp)
        except APIError as e:
            yield ev("error", code=e.code, message=e.message, param=e.param)
        except Exception as e:  # a bug: still end the stream with an error event
            log.exception("error while streaming a response")
            yield ev("error", code="server_error", message=f"internal error: "
                     f"{type(e).__name__}", param=None)
        finally:
            slot.release()
