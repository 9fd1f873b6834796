"""POST /v1/chat/completions: a conversation in, a chat.completion (or its chunks) out.

Tools are rendered by the model's own chat template; its output goes through the
reasoning parser (thinking models) and the tool-call parser (yun/server/parsing.py).
`response_format`, `guided_*` and `tool_choice` "required" / a named function constrain
the output (yun/server/structured.py -> the engine's guided decoding).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from yun.outputs import CompletionOutput, RequestOutput
from yun.sampling_params import SamplingParams
from yun.server.errors import APIError, bad_request
from yun.server.logprobs import chat_logprobs
from yun.server.parsing import MessageParser, ParsedMessage
from yun.server.prompts import render_chat
from yun.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut,
                                 ToolCall, Usage, chat_sampling_params)
from yun.server.reasoning import ThinkParser, resolve_reasoning_parser
from yun.server.serving import ChoiceState, Job, OpenAIServing, Slot, usage
from yun.server.streams import SSE_DONE, SSEResponse, sse
from yun.server.structured import ToolPlan, guided_from_fields, plan_tools
from yun.server.tool_parsers import (JsonArrayToolParser, NamedToolParser, ToolParser,
                                     resolve_tool_parser)

log = logging.getLogger("yun.server")

Chunk = Callable[..., str]


class ChatCompletions:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.tokenizer = serving.tokenizer
        template = self.tokenizer.chat_template
        settings = serving.settings
        self.tool_parser = resolve_tool_parser(settings.tool_call_parser, template)
        self.reasoning_parser = resolve_reasoning_parser(settings.reasoning_parser, template)
        # Tags that are special tokens vanish from text that skips special tokens: keep
        # them (and drop the EOS token's text that then ends the output).
        self.special_tools = self._special(self.tool_parser)
        self.special_reasoning = self._special(self.reasoning_parser)
        eos = {self.tokenizer.decode([t], False) for t in serving.engine.model_config.eos_token_ids}
        self.eos_texts = tuple(sorted(eos | {self.tokenizer.eos_token or ""}))

    async def __call__(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        s = self.serving
        s.check_model(req.model)
        plan = plan_tools(req)
        if plan.mode == "auto" and self.tool_parser is None:
            raise bad_request("this model's chat template writes tool calls in no format yun "
                              "knows: start the server with --tool-call-parser, or send "
                              "tool_choice \"required\" or a named function", "tools")
        guided, guided_param = guided_from_fields(req)
        if plan.guided is not None:
            if guided is not None:
                raise bad_request(f"tool_choice {plan.mode!r} already constrains the output; "
                                  f"it cannot be combined with {guided_param}", guided_param)
            guided, guided_param = plan.guided, "tools"
        params = chat_sampling_params(req, guided)
        if self._keeps_special(req, plan):
            params = replace(params, skip_special_tokens=False)
        text, ids = await run_in_threadpool(render_chat, self.tokenizer, req.messages,
                                            req.add_generation_prompt is not False,
                                            req.chat_template_kwargs, plan.tools)
        s.check_prompt(ids, params, "messages")
        params = self._after_reasoning(params, text)
        if params.guided is not None:
            await s.check_guided(params.guided, guided_param)
        job = Job(ids, text, params, f"chatcmpl-{uuid.uuid4().hex}")
        new_parser = lambda: self._parser(req, plan, text)  # noqa: E731 - one per choice
        slot = await s.admit(raw, [job], job.request_id)
        if req.stream:
            return SSEResponse(self._stream(req, job, arrival, slot, new_parser, plan),
                               on_close=slot.release)
        return await s.respond(raw, slot, self._full(job, arrival, new_parser, plan))

    # ---- parsing -------------------------------------------------------------------------
    def _special(self, parser: Any) -> bool:
        tok = self.tokenizer
        for marker in getattr(parser, "markers", ()):
            ids = tok.encode(marker, add_special_tokens=False)
            if len(ids) == 1 and tok.decode(ids, True) == "" and tok.decode(ids, False):
                return True
        return False

    def _keeps_special(self, req: ChatCompletionRequest, plan: ToolPlan) -> bool:
        return ((plan.mode == "auto" and self.special_tools)
                or (self.special_reasoning and req.separate_reasoning is not False))

    def _starts_inside(self, prompt: str | None) -> bool:
        return self.reasoning_parser is not None and ThinkParser.starts_inside(prompt)

    def _after_reasoning(self, params: SamplingParams, prompt: str | None) -> SamplingParams:
        """A thinking model whose prompt opened its reasoning: the constraint starts after
        the model closes it."""
        if params.guided is None or not self._starts_inside(prompt):
            return params
        end = tuple(self.tokenizer.encode(ThinkParser.end_tag, add_special_tokens=False))
        return replace(params, guided=replace(params.guided, start_after=end))

    def _parser(self, req: ChatCompletionRequest, plan: ToolPlan,
                prompt: str | None) -> MessageParser:
        reasoning = None
        if self.reasoning_parser is not None and req.separate_reasoning is not False:
            reasoning = self.reasoning_parser(self._starts_inside(prompt))
        tools: ToolParser | None = None
        if plan.mode == "auto":
            tools = self.tool_parser()  # type: ignore[misc]  (checked in __call__)
        elif plan.mode == "required":
            tools = JsonArrayToolParser()
        elif plan.mode == "named":
            tools = NamedToolParser(plan.name or "")
        return MessageParser(reasoning, tools,
                             max_calls=1 if req.parallel_tool_calls is False else None,
                             drop_end=self.eos_texts if self._keeps_special(req, plan) else ())

    @staticmethod
    def _finish_reason(reason: str | None, parser: MessageParser, plan: ToolPlan) -> str | None:
        # As OpenAI: "tool_calls" when the model chose to call; a forced named call "stop"s.
        if reason == "stop" and parser.num_calls and plan.mode != "named":
            return "tool_calls"
        return reason

    def _reasoning_tokens(self, c: CompletionOutput, parser: MessageParser,
                          skip_special: bool) -> int:
        """Output tokens up to the end of the reasoning (the shortest prefix whose text
        covers it)."""
        end = parser.reasoning.reasoning_end if parser.reasoning is not None else 0
        if end <= 0:
            return 0
        ids, lo, hi = c.token_ids, 0, len(c.token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special)) >= end:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _usage(self, out: RequestOutput, job: Job, parsers: list[MessageParser]) -> Usage:
        u = usage([out], [job])
        if self.reasoning_parser is not None and any(p.reasoning for p in parsers):
            skip = job.params.skip_special_tokens
            n = sum(self._reasoning_tokens(c, parsers[c.index], skip) for c in out.outputs)
            u.completion_tokens_details = {"reasoning_tokens": n}
        return u

    # ---- the whole response --------------------------------------------------------------
    async def _full(self, job: Job, arrival: float, new_parser: Callable[[], MessageParser],
                    plan: ToolPlan) -> dict[str, Any]:
        (out,) = await self.serving.run_all([job], arrival)
        top = job.params.logprobs
        choices, parsers = [], []
        for c in out.outputs:
            lps = None
            if top is not None:
                content = await run_in_threadpool(chat_logprobs, self.tokenizer, c.token_ids,
                                                  c.logprobs or [], top)
                lps = {"content": content}
            parser = new_parser()
            parsers.append(parser)
            msg = parser.parse(c.text) if parser.active else ParsedMessage(c.text)
            message = ChatMessageOut(content=msg.content, reasoning_content=msg.reasoning_content,
                                     tool_calls=[ToolCall(**tc) for tc in msg.tool_calls] or None)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=lps,
                                      finish_reason=self._finish_reason(c.finish_reason, parser,
                                                                        plan)))
        u = await run_in_threadpool(self._usage, out, job, parsers)
        resp = ChatCompletionResponse(id=job.request_id, model=self.serving.model_name,
                                      choices=choices, usage=u)
        return resp.model_dump(mode="json")

    # ---- streaming -----------------------------------------------------------------------
    async def _stream(self, req: ChatCompletionRequest, job: Job, arrival: float, slot: Slot,
                      new_parser: Callable[[], MessageParser], plan: ToolPlan
                      ) -> AsyncIterator[str]:
        """The role delta of each choice, then its deltas (reasoning_content, content,
        tool_calls), a finish chunk per choice, then (include_usage) a usage chunk and
        [DONE]. Errors after the 200 become an event."""
        created, n = int(time.time()), job.params.n
        states = [ChoiceState() for _ in range(n)]
        parsers = [new_parser() for _ in range(n)]
        last: RequestOutput | None = None

        def chunk(choices: list[ChatChunkChoice], final_usage: Usage | None = None) -> str:
            u = final_usage or (usage([last], [job]) if req.continuous_usage else None)
            return sse(ChatCompletionChunk(id=job.request_id, created=created,
                                           model=self.serving.model_name, choices=choices,
                                           usage=u).model_dump_json())

        try:
            for i in range(n):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            async for out in self.serving.generate(job, arrival):
                last = out
                for c in out.outputs:
                    for event in self._deltas(c, states[c.index], parsers[c.index],
                                              job.params.logprobs, chunk, plan):
                        yield event
            if req.include_usage and last is not None:
                yield chunk([], final_usage=await run_in_threadpool(self._usage, last, job,
                                                                    parsers))
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # a bug: still end the stream with an error event
            log.exception("error while streaming a chat completion")
            yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            slot.release()

    def _deltas(self, c: CompletionOutput, st: ChoiceState, parser: MessageParser,
                top: int | None, chunk: Chunk, plan: ToolPlan) -> list[str]:
        """Events for what is new in choice `c` since the last call."""
        if st.finished:
            return []
        new_text = c.text[st.text_sent:]
        finished = c.finish_reason is not None
        if parser.active:
            deltas = parser.feed(new_text) if new_text else []
            if finished:
                deltas += parser.finish()
        else:
            deltas = [{"content": new_text}] if new_text else []
        lps = None
        if top is not None and len(c.token_ids) > st.tokens_sent:
            lps = {"content": chat_logprobs(self.tokenizer, c.token_ids[st.tokens_sent:],
                                            (c.logprobs or [])[st.tokens_sent:], top)}
        if lps and not deltas:
            deltas = [{"content": ""}]
        events = [chunk([ChatChunkChoice(index=c.index, delta=d, logprobs=lps if k == 0 else None)])
                  for k, d in enumerate(deltas)]
        st.text_sent, st.tokens_sent = len(c.text), len(c.token_ids)
        if finished:
            st.finished = True
            reason = self._finish_reason(c.finish_reason, parser, plan)
            events.append(chunk([ChatChunkChoice(index=c.index, delta={}, finish_reason=reason)]))
        return events
