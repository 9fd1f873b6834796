"""Chat and text completions: requests in, engine generations, OpenAI responses out.

A request becomes one `Job` per prompt (a chat is one prompt; a completions request may
hold several). Each job runs `AsyncEngine.generate`, whose outputs are cumulative; the
stream builders send per-choice deltas computed from the cumulative text and token ids.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from yun.outputs import CompletionOutput, RequestOutput
from yun.sampling_params import SamplingParams
from yun.server.errors import APIError, bad_request
from yun.server.logprobs import chat_logprobs, completion_logprobs
from yun.server.metrics import ServerMetrics
from yun.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatMessage, ChatMessageOut, CompletionChoice, CompletionRequest,
    CompletionResponse, DetokenizeRequest, TokenizeRequest, Usage, chat_sampling_params,
    check_chat_features, completion_sampling_params)
from yun.server.settings import ServerSettings
from yun.server.streams import SSE_DONE, ClientGone, SSEResponse, merge, sse, unless_disconnected

if TYPE_CHECKING:
    from yun.engine.async_engine import AsyncEngine

log = logging.getLogger("yun.server")

# chat_template_kwargs keys that would change what apply_chat_template returns.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass
class Job:
    """One prompt to generate for."""

    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    request_id: str


@dataclass
class _ChoiceState:
    """What a stream has already sent of one choice."""

    text_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class _Slot:
    """Admission of `size` prompts; released once their generations end."""

    owner: "OpenAIServing"
    size: int
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner.in_flight -= self.size


def _usage(outputs: list[RequestOutput | None], jobs: list[Job]) -> Usage:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content a string, tool arguments a dict."""
    content = m.content
    if isinstance(content, list):
        content = "\n".join(p.text or "" for p in content)
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                         "content": content or ""}
    if m.name:
        d["name"] = m.name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            call = dict(call)
            fn = call.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    call["function"] = {**fn, "arguments": json.loads(fn["arguments"])}
                except ValueError:
                    pass
            calls.append(call)
        d["tool_calls"] = calls
    return d


class OpenAIServing:
    """The OpenAI endpoints over one AsyncEngine."""

    def __init__(self, engine: "AsyncEngine", settings: ServerSettings, model_name: str,
                 metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        self.in_flight = 0  # prompts admitted and not finished

    # ---- checks shared by the endpoints ------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def admit(self, num_prompts: int) -> _Slot:
        """Take `num_prompts` slots or refuse with 429 when the queue is full."""
        capacity = self.engine.config.max_num_seqs + self.settings.max_queue
        if num_prompts > capacity:
            raise bad_request(f"too many prompts in one request ({num_prompts}); this server "
                              f"takes at most {capacity} at once", "prompt")
        load = max(self.in_flight, self.engine.num_unfinished)
        if load + num_prompts > capacity:
            raise APIError(429, f"the server is busy ({load} requests in flight, at most "
                           f"{capacity}); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"})
        self.in_flight += num_prompts
        return _Slot(self, num_prompts)

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str) -> None:
        """The engine's own input checks, made before the response starts (so a stream
        never has to report them after its 200)."""
        n, limit = len(ids), self.engine.max_model_len
        if n == 0:
            raise bad_request("the prompt is empty: at least one token is needed", param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: the vocabulary has "
                              f"{self.vocab_size} tokens", param)
        if n >= limit:
            raise bad_request(f"the prompt has {n} tokens, but the model's context length "
                              f"is {limit} tokens", param)
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise bad_request(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is "
                f"{n + params.max_tokens} tokens, more than the model's context length of "
                f"{limit} tokens", "max_tokens")

    # ---- prompts (run in a worker thread: they can take a while) ------------------------
    def _render_chat(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}",
                              "chat_template_kwargs")
        messages = [_message_dict(m) for m in req.messages]
        add_prompt = req.add_generation_prompt is not False
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt,
                                                      **kwargs)
        except Exception as e:  # template errors are about the input (roles, content)
            raise bad_request(f"cannot render the chat template: {e}", "messages") from e
        if not isinstance(text, str):
            raise bad_request("the chat template did not render to text", "messages")
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def _completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt must not be empty", "prompt")
        add_special = req.add_special_tokens is not False
        out: list[tuple[str | None, list[int]]] = []
        for item in items:
            if isinstance(item, str):
                out.append((item, self.tokenizer.encode(item, add_special_tokens=add_special)))
            else:
                out.append((None, list(item)))
        return out

    def _echo_text(self, job: Job) -> str:
        if job.prompt_text is not None:
            return job.prompt_text
        return self.tokenizer.decode(job.prompt_ids, skip_special_tokens=False)

    # ---- running generations -----------------------------------------------------------
    async def _generate(self, job: Job, arrival: float) -> AsyncIterator[RequestOutput]:
        """engine.generate with input errors as 400, a dead engine as 503, and metrics."""
        first_token: float | None = None
        last: RequestOutput | None = None
        try:
            stream = self.engine.generate(job.prompt_ids, job.params, job.request_id,
                                          job.prompt_text)
            try:
                async for out in stream:
                    if first_token is None and any(c.token_ids for c in out.outputs):
                        first_token = time.perf_counter()
                    last = out
                    yield out
            finally:
                await stream.aclose()
        except ValueError as e:
            raise bad_request(str(e)) from e
        except APIError:
            raise
        except Exception as e:
            if not self.engine.is_alive:
                raise APIError(503, f"the engine is not running: {e}") from e
            raise
        finally:
            self._record(last, job, arrival, first_token)

    def _record(self, last: RequestOutput | None, job: Job, arrival: float,
                first_token: float | None) -> None:
        reasons = [c.finish_reason or "abort" for c in last.outputs] if last else ["abort"]
        tokens = sum(len(c.token_ids) for c in last.outputs) if last else 0
        self.metrics.observe_finished(
            prompt_tokens=len(job.prompt_ids), output_tokens=tokens, finish_reasons=reasons,
            ttft=None if first_token is None else first_token - arrival,
            e2e=time.perf_counter() - arrival)

    async def _run_all(self, jobs: list[Job], arrival: float) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(jobs)
        async for i, out in merge([self._generate(j, arrival) for j in jobs]):
            finals[i] = out
        if any(f is None or not f.finished for f in finals):
            raise APIError(503, "the engine stopped before the request finished")
        return finals  # type: ignore[return-value]

    async def _respond(self, raw: Request, slot: _Slot, work: Any) -> Response:
        try:
            body = await unless_disconnected(raw, work)
        except ClientGone:
            return Response(status_code=499)
        finally:
            slot.release()
        return JSONResponse(body)

    # ---- chat completions --------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        self.check_model(req.model)
        check_chat_features(req)
        params = chat_sampling_params(req)
        text, ids = await run_in_threadpool(self._render_chat, req)
        self.check_prompt(ids, params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job = Job(ids, text, params, rid)
        slot = self.admit(1)
        if req.stream:
            return SSEResponse(self._chat_stream(req, job, arrival, slot), on_close=slot.release)
        return await self._respond(raw, slot, self._chat_full(req, job, arrival))

    async def _chat_full(self, req: ChatCompletionRequest, job: Job,
                         arrival: float) -> dict[str, Any]:
        (out,) = await self._run_all([job], arrival)
        top = job.params.logprobs
        choices = []
        for c in out.outputs:
            lps = None
            if top is not None:
                content = await run_in_threadpool(chat_logprobs, self.tokenizer, c.token_ids,
                                                  c.logprobs or [], top)
                lps = {"content": content}
            choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                                      logprobs=lps, finish_reason=c.finish_reason))
        resp = ChatCompletionResponse(id=job.request_id, model=self.model_name,
                                      choices=choices, usage=_usage([out], [job]))
        return resp.model_dump(mode="json")

    async def _chat_stream(self, req: ChatCompletionRequest, job: Job, arrival: float,
                           slot: _Slot) -> AsyncIterator[str]:
        created = int(time.time())
        n, top = job.params.n, job.params.logprobs
        states = [_ChoiceState() for _ in range(n)]
        last: RequestOutput | None = None

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            if req.continuous_usage and usage is None:
                usage = _usage([last], [job])
            return sse(ChatCompletionChunk(id=job.request_id, created=created,
                                           model=self.model_name, choices=choices,
                                           usage=usage).model_dump_json())

        try:
            for i in range(n):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            async for out in self._generate(job, arrival):
                last = out
                for c in out.outputs:
                    for event in self._chat_deltas(c, states[c.index], top, chunk):
                        yield event
            if req.include_usage:
                yield chunk([], usage=_usage([last], [job]))
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # after the 200 an error can only be reported in the stream
            log.exception("error while streaming a chat completion")
            yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            slot.release()

    def _chat_deltas(self, c: CompletionOutput, st: _ChoiceState, top: int | None,
                     chunk: Any) -> list[str]:
        if st.finished:
            return []
        events = []
        new_text = c.text[st.text_sent:]
        lps = None
        if top is not None and len(c.token_ids) > st.tokens_sent:
            lps = {"content": chat_logprobs(self.tokenizer, c.token_ids[st.tokens_sent:],
                                            (c.logprobs or [])[st.tokens_sent:], top)}
        if new_text or lps:
            events.append(chunk([ChatChunkChoice(index=c.index, delta={"content": new_text},
                                                 logprobs=lps)]))
        st.text_sent, st.tokens_sent = len(c.text), len(c.token_ids)
        if c.finish_reason is not None:
            st.finished = True
            events.append(chunk([ChatChunkChoice(index=c.index, delta={},
                                                 finish_reason=c.finish_reason)]))
        return events

    # ---- text completions --------------------------------------------------------------
    async def completion(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        self.check_model(req.model)
        params = completion_sampling_params(req)
        prompts = await run_in_threadpool(self._completion_prompts, req)
        for text, ids in prompts:
            self.check_prompt(ids, params, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = [Job(ids, text, params, rid if len(prompts) == 1 else f"{rid}-{i}")
                for i, (text, ids) in enumerate(prompts)]
        slot = self.admit(len(jobs))
        if req.stream:
            return SSEResponse(self._completion_stream(req, rid, jobs, arrival, slot),
                               on_close=slot.release)
        return await self._respond(raw, slot, self._completion_full(req, rid, jobs, arrival))

    def _prompt_only(self, req: CompletionRequest) -> bool:
        """`echo` with `max_tokens: 0`: score the prompt, generate nothing."""
        return bool(req.echo) and req.max_tokens == 0

    def _visible(self, req: CompletionRequest, c: CompletionOutput
                 ) -> tuple[str, list[int], list[Any], str | None]:
        if self._prompt_only(req):
            return "", [], [], "length" if c.finish_reason is not None else None
        return c.text, c.token_ids, c.logprobs or [], c.finish_reason

    async def _completion_full(self, req: CompletionRequest, rid: str, jobs: list[Job],
                               arrival: float) -> dict[str, Any]:
        finals = await self._run_all(jobs, arrival)
        choices = await run_in_threadpool(self._completion_choices, req, jobs, finals)
        outputs = finals
        if self._prompt_only(req):
            outputs = [None] * len(finals)
        resp = CompletionResponse(id=rid, model=self.model_name, choices=choices,
                                  usage=_usage(outputs, jobs))
        return resp.model_dump(mode="json")

    def _completion_choices(self, req: CompletionRequest, jobs: list[Job],
                            finals: list[RequestOutput]) -> list[CompletionChoice]:
        n = jobs[0].params.n
        choices = []
        for p, (job, out) in enumerate(zip(jobs, finals)):
            for c in out.outputs:
                text, ids, entries, reason = self._visible(req, c)
                lps = None
                if req.logprobs is not None:
                    if req.echo:
                        prompt_entries = out.prompt_logprobs or [None] * len(job.prompt_ids)
                        ids, entries = job.prompt_ids + ids, list(prompt_entries) + entries
                    lps = completion_logprobs(self.tokenizer, ids, entries, req.logprobs)[0]
                if req.echo:
                    text = self._echo_text(job) + text
                choices.append(CompletionChoice(index=p * n + c.index, text=text,
                                                logprobs=lps.as_dict() if lps else None,
                                                finish_reason=reason))
        return choices

    async def _completion_stream(self, req: CompletionRequest, rid: str, jobs: list[Job],
                                 arrival: float, slot: _Slot) -> AsyncIterator[str]:
        created = int(time.time())
        n = jobs[0].params.n
        states = [[_ChoiceState() for _ in range(n)] for _ in jobs]
        latest: list[RequestOutput | None] = [None] * len(jobs)

        def usage() -> Usage:
            return _usage([None] * len(jobs) if self._prompt_only(req) else latest, jobs)

        def chunk(choices: list[CompletionChoice], final_usage: Usage | None = None) -> str:
            u = final_usage or (usage() if req.continuous_usage else None)
            return sse(CompletionResponse(id=rid, created=created, model=self.model_name,
                                          choices=choices, usage=u).model_dump_json())

        try:
            async for p, out in merge([self._generate(j, arrival) for j in jobs]):
                latest[p] = out
                for c in out.outputs:
                    choice = self._completion_delta(req, jobs[p], out, c, states[p][c.index],
                                                    p * n + c.index)
                    if choice is not None:
                        yield chunk([choice])
            if req.include_usage:
                yield chunk([], final_usage=usage())
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
        except Exception as e:
            log.exception("error while streaming a completion")
            yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            slot.release()

    def _completion_delta(self, req: CompletionRequest, job: Job, out: RequestOutput,
                          c: CompletionOutput, st: _ChoiceState,
                          index: int) -> CompletionChoice | None:
        if st.finished:
            return None
        text, ids, entries, reason = self._visible(req, c)
        new_text = text[st.text_sent:]
        new_ids, new_entries = ids[st.tokens_sent:], list(entries[st.tokens_sent:])
        if not st.started:
            st.started = True
            if req.echo:
                new_text = self._echo_text(job) + new_text
                prompt_entries = out.prompt_logprobs or [None] * len(job.prompt_ids)
                new_ids, new_entries = job.prompt_ids + new_ids, list(prompt_entries) + new_entries
        lps = None
        if req.logprobs is not None and new_ids:
            built, st.text_offset = completion_logprobs(self.tokenizer, new_ids, new_entries,
                                                        req.logprobs, st.text_offset)
            lps = built.as_dict()
        st.text_sent, st.tokens_sent = len(text), len(ids)
        if reason is not None:
            st.finished = True
        if not new_text and lps is None and reason is None:
            return None
        return CompletionChoice(index=index, text=new_text, logprobs=lps, finish_reason=reason)

    # ---- tokenizer endpoints -----------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest(messages=req.messages,
                                         add_generation_prompt=req.add_generation_prompt)
            text, ids = await run_in_threadpool(self._render_chat, chat)
            if req.add_special_tokens:
                ids = await run_in_threadpool(self.tokenizer.encode, text, True)
        else:
            add = req.add_special_tokens is not False
            ids = await run_in_threadpool(self.tokenizer.encode, req.prompt, add)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        bad = next((t for t in req.tokens if t >= self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: the vocabulary has "
                              f"{self.vocab_size} tokens", "tokens")
        text = await run_in_threadpool(self.tokenizer.decode, req.tokens, False)
        return {"prompt": text}

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "eos_token_id": tok.eos_token_id,
                "chat_template": tok.chat_template, "model_max_length": self.engine.max_model_len,
                "vocab_size": self.vocab_size, "tokenizer_class": type(tok.hf).__name__}


__all__ = ["OpenAIServing", "Job"]
