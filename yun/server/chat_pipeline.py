"""The chat path every conversational endpoint shares: a `ChatCompletionRequest` in, a
prepared generation out (prompt rendered by the model's chat template with its tools,
SamplingParams built once by the input processor, output constraint compiled once and
handed to the engine) plus one `MessageParser` per choice (reasoning split, then tool
calls).

`/v1/chat/completions` (chat.py), `/v1/messages` (anthropic.py) and `/v1/responses`
(responses.py) translate their own request into a `ChatCompletionRequest`, run it here,
and translate the parser's deltas into their own output shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool

from yun.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from yun.sampling_params import GuidedDecoding
from yun.server.errors import APIError, bad_request
from yun.server.parsing import MessageParser
from yun.server.prompts import Prompt, check_history, render_chat
from yun.server.protocol import ChatCompletionRequest, Usage, chat_sampling_fields
from yun.server.reasoning import ThinkParser, resolve_reasoning_parser
from yun.server.serving import Job, OpenAIServing, usage
from yun.server.structured import ToolPlan, guided_from_fields, plan_tools
from yun.server.tool_parsers import (JsonArrayToolParser, NamedToolParser, ToolParser,
                                     resolve_tool_parser)


@dataclass
class PreparedChat:
    """A chat request ready to run: its job, tool plan, and a parser factory (one per
    choice)."""

    request: ChatCompletionRequest
    job: Job
    plan: ToolPlan
    new_parser: Callable[[], MessageParser]


class ChatPipeline:
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

    @property
    def thinks(self) -> bool:
        """Whether this model's output is split into reasoning and answer."""
        return self.reasoning_parser is not None

    async def render(self, req: ChatCompletionRequest, plan: ToolPlan | None = None) -> Prompt:
        """The prompt text and ids of `req` (its tools as the template lays them out)."""
        check_history(req.messages)
        plan = plan or plan_tools(req)
        kwargs = dict(req.chat_template_kwargs or {})
        if req.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", req.reasoning_effort)
            if req.reasoning_effort == "none":
                kwargs.setdefault("enable_thinking", False)
        return await run_in_threadpool(render_chat, self.tokenizer, req.messages,
                                       req.add_generation_prompt is not False,
                                       kwargs, plan.tools)

    async def prepare(self, req: ChatCompletionRequest, request_id: str,
                      names: dict[str, str] | None = None, priority: int = 0) -> PreparedChat:
        """Everything that can fail with a 400, done before the response starts. `names`
        renames chat fields in errors to the front end's own (max_tokens ->
        max_output_tokens); `priority`: the request's scheduling class
        (`OpenAIServing.priority`)."""
        try:
            return await self._prepare(req, request_id, priority)
        except APIError as e:
            if names and e.param:
                head = e.param.split(".")[0].split("[")[0]
                if head in names:
                    new = names[head] + e.param[len(head):]
                    if e.message.startswith(e.param):
                        e.message = new + e.message[len(e.param):]
                    e.message = e.message.replace(f"{head} (", f"{names[head]} (")
                    e.param = new
            raise

    async def _prepare(self, req: ChatCompletionRequest, request_id: str,
                       priority: int) -> PreparedChat:
        """The input processor's steps, each once: the constraint, the server's bounds,
        the prompt (template, tools, encode), SamplingParams (built and validated once),
        the prompt checks, the grammar (compiled once, handed to the engine)."""
        s = self.serving
        s.check_model(req.model, task="generate")
        plan = plan_tools(req)
        if plan.mode == "auto" and self.tool_parser is None:
            raise bad_request("this model's chat template writes tool calls in no format yun "
                              "knows: start the server with --tool-call-parser, or send "
                              "tool_choice \"required\" or a named function", "tools")
        guided, guided_param = self._constraint(req, plan)
        fields = chat_sampling_fields(req)  # the server's own bounds, before rendering
        text, ids = await self.render(req, plan)
        guided = self._after_reasoning(guided, text)
        more: dict[str, Any] = {"guided": guided, "priority": priority,
                                "output_kind": RequestOutputKind.DELTA}
        if self._keeps_special(req, plan):
            more["skip_special_tokens"] = False
        params = fields.build(s.inputs, **more)
        s.check_prompt(ids, params, "messages")
        grammar = None if guided is None else await s.check_guided(guided, guided_param)
        job = Job(ids, text, params, request_id, grammar=grammar)
        return PreparedChat(req, job, plan, lambda: self._parser(req, plan, text))

    @staticmethod
    def _constraint(req: ChatCompletionRequest, plan: ToolPlan
                    ) -> tuple[GuidedDecoding | None, str | None]:
        """The output constraint (response_format / guided_* or the tool choice's) and the
        field it came from."""
        guided, guided_param = guided_from_fields(req)
        if plan.guided is not None:
            if guided is not None:
                raise bad_request(f"tool_choice {plan.mode!r} already constrains the output; "
                                  f"it cannot be combined with {guided_param}", guided_param)
            guided, guided_param = plan.guided, "tools"
        return guided, guided_param

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

    def _after_reasoning(self, guided: GuidedDecoding | None,
                         prompt: str | None) -> GuidedDecoding | None:
        """A thinking model whose prompt opened its reasoning: the constraint starts after
        the model closes it."""
        if guided is None or not self._starts_inside(prompt):
            return guided
        end = tuple(self.tokenizer.encode(ThinkParser.end_tag, add_special_tokens=False))
        return replace(guided, start_after=end)

    def _parser(self, req: ChatCompletionRequest, plan: ToolPlan,
                prompt: str | None) -> MessageParser:
        reasoning = None
        if self.reasoning_parser is not None and req.separate_reasoning is not False:
            reasoning = self.reasoning_parser(self._starts_inside(prompt))
        tools: ToolParser | None = None
        if plan.mode == "auto":
            tools = self.tool_parser()  # type: ignore[misc]  (checked in prepare)
        elif plan.mode == "required":
            tools = JsonArrayToolParser()
        elif plan.mode == "named":
            tools = NamedToolParser(plan.name or "")
        return MessageParser(reasoning, tools,
                             max_calls=1 if req.parallel_tool_calls is False else None,
                             drop_end=self.eos_texts if self._keeps_special(req, plan) else ())

    @staticmethod
    def finish_reason(reason: str | None, parser: MessageParser, plan: ToolPlan) -> str | None:
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

    def usage(self, out: RequestOutput, job: Job, parsers: list[MessageParser]) -> Usage:
        """Token counts; reasoning tokens for thinking models; prompt tokens served from
        the prefix cache."""
        u = usage([out], [job])
        if self.reasoning_parser is not None and any(p.reasoning for p in parsers):
            skip = job.params.skip_special_tokens
            n = sum(self._reasoning_tokens(c, parsers[c.index], skip) for c in out.outputs)
            u.completion_tokens_details = {"reasoning_tokens": n}
        return u
