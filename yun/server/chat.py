"""POST /v1/chat/completions: a conversation in, a chat.completion (or its chunks) out."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from yun.outputs import CompletionOutput, RequestOutput
from yun.server.errors import APIError
from yun.server.logprobs import chat_logprobs
from yun.server.prompts import render_chat
from yun.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut,
                                 Usage, chat_sampling_params, check_chat_features)
from yun.server.serving import ChoiceState, Job, OpenAIServing, Slot, usage
from yun.server.streams import SSE_DONE, SSEResponse, sse

log = logging.getLogger("yun.server")

Chunk = Callable[..., str]


class ChatCompletions:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.tokenizer = serving.tokenizer

    async def __call__(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.perf_counter()
        s = self.serving
        s.check_model(req.model)
        check_chat_features(req)
        params = chat_sampling_params(req)
        text, ids = await run_in_threadpool(render_chat, self.tokenizer, req.messages,
                                            req.add_generation_prompt is not False,
                                            req.chat_template_kwargs)
        s.check_prompt(ids, params, "messages")
        job = Job(ids, text, params, f"chatcmpl-{uuid.uuid4().hex}")
        slot = s.admit(1)
        if req.stream:
            return SSEResponse(self._stream(req, job, arrival, slot), on_close=slot.release)
        return await s.respond(raw, slot, self._full(job, arrival))

    async def _full(self, job: Job, arrival: float) -> dict[str, Any]:
        (out,) = await self.serving.run_all([job], arrival)
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
        resp = ChatCompletionResponse(id=job.request_id, model=self.serving.model_name,
                                      choices=choices, usage=usage([out], [job]))
        return resp.model_dump(mode="json")

    async def _stream(self, req: ChatCompletionRequest, job: Job, arrival: float,
                      slot: Slot) -> AsyncIterator[str]:
        """The role delta of each choice, content deltas, a finish chunk per choice, then
        (include_usage) a usage chunk and [DONE]. Errors after the 200 become an event."""
        created, n = int(time.time()), job.params.n
        states = [ChoiceState() for _ in range(n)]
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
                    for event in self._deltas(c, states[c.index], job.params.logprobs, chunk):
                        yield event
            if req.include_usage:
                yield chunk([], final_usage=usage([last], [job]))
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # a bug: still end the stream with an error event
            log.exception("error while streaming a chat completion")
            yield sse(APIError(500, f"internal error: {type(e).__name__}").body())
        finally:
            slot.release()

    def _deltas(self, c: CompletionOutput, st: ChoiceState, top: int | None,
                chunk: Chunk) -> list[str]:
        """Events for what is new in choice `c` since the last call."""
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
