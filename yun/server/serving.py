"""What every endpoint shares: model check, admission (429), prompt checks, and running
generations on the engine with errors mapped to statuses and metrics recorded.

A request becomes one `Job` per prompt (a chat is one prompt; a completions request may
hold several). Each job runs `EngineClient.generate` (yun/engine/client.py) asking for
DELTA outputs: the endpoints stream what each output holds as it is, and read the sum
so far (usage, the whole response) from `Job.total`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from yun.engine.errors import EngineDeadError
from yun.engine.inputs import InputProcessor, check_prompt, eos_token_ids
from yun.outputs import RequestOutput, RequestOutputKind, accumulate
from yun.sampling_params import GuidedDecoding, InvalidParam, SamplingParams
from yun.server.errors import APIError, bad_request
from yun.server.metrics import ServerMetrics
from yun.server.prompts import render_chat
from yun.server.protocol import DetokenizeRequest, TokenizeRequest, Usage
from yun.server.settings import ServerSettings
from yun.server.streams import ClientGone, merge, unless_disconnected

if TYPE_CHECKING:
    from yun.engine.client import EngineClient
    from yun.tenants.gate import TenantGate, UsageMeter


@dataclass
class Job:
    """One prompt to generate for."""

    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams  # built once by the input processor (output kind DELTA)
    request_id: str
    grammar: Any = None  # params.guided as the engine compiled it (check_guided)
    bills_output: bool = True  # False when the output is not returned (echo, max_tokens 0)
    meter: "UsageMeter | None" = None  # the tenant's usage record (set by admit)
    total: RequestOutput | None = None  # the outputs so far, added up (set by generate)


@dataclass
class ChoiceState:
    """What a stream has already sent of one choice."""

    tokens_sent: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class Slot:
    """Admission of `size` prompts; released (once) when their generations end."""

    owner: "OpenAIServing"
    size: int
    released: bool = False
    meter: "UsageMeter | None" = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner.in_flight -= self.size
            if self.meter is not None:
                self.meter.abandon()


def new_id(prefix: str, sep: str = "-") -> str:
    """A fresh request id, e.g. `chatcmpl-<32 hex>` (also the engine's request id)."""
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def usage(outputs: list[RequestOutput | None], jobs: list[Job]) -> Usage:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs if o is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached})


class OpenAIServing:
    """The engine as the endpoints see it."""

    def __init__(self, engine: "EngineClient", settings: ServerSettings, model_name: str,
                 metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        # The input processor the engine would use: same tokenizer, same EOS ids, so the
        # params built here go to the engine as they are.
        self.inputs = InputProcessor(self.tokenizer, eos_token_ids(
            engine.model_config.eos_token_ids, self.tokenizer.eos_token_id))
        self.in_flight = 0  # prompts admitted and not finished
        self.draining = False  # set when the server shuts down
        self.tenants: "TenantGate | None" = None  # multi-tenant mode (yun/server/tenancy.py)

    # ---- checks ------------------------------------------------------------------------
    def check_model(self, model: str | None, task: str | None = None) -> None:
        """404 for another model's name; 400 when the model does not do `task`
        ("generate" or "embed"; None: any)."""
        if model and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")
        served = self.engine.task
        if task is not None and task != served:
            what = ("embeddings (/v1/embeddings) only" if served == "embed"
                    else "text generation; start it with --task embed for embeddings")
            raise bad_request(f"this model serves {what}", "model")

    def priority(self, raw: Request) -> int:
        """The scheduling priority of this request's jobs: its tenant's class (0 without
        tenants). Read before the params are built, so they are built once."""
        if self.tenants is None:
            return 0
        from yun.server.tenancy import principal_of

        return principal_of(raw).priority

    async def admit(self, raw: Request, jobs: list[Job], request_id: str) -> Slot:
        """Take a slot per job (429 when the queue is full); with tenants, also admit the
        request against its tenant's limits (401 / 403 / 429) and open its usage record."""
        slot = self.take(len(jobs))
        if self.tenants is None:
            return slot
        from yun.server.tenancy import admit

        room = self.engine.max_model_len
        reserved = sum(len(j.prompt_ids) + j.params.n * (
            j.params.max_tokens or room - len(j.prompt_ids)) for j in jobs)
        try:
            meter = await admit(self.tenants, raw, request_id, self.model_name, reserved,
                                len(jobs))
        except BaseException:
            slot.release()
            raise
        for j in jobs:
            j.meter = meter
        slot.meter = meter
        return slot

    def take(self, num_prompts: int) -> Slot:
        """Take `num_prompts` slots; 429 when the queue is full, 503 when the engine is not
        running. Capacity: --max-num-seqs running plus --max-queue waiting."""
        if self.draining or not self.engine.is_alive:
            raise APIError(503, "the server is shutting down" if self.draining
                           else "the engine is not running", code="engine_not_running")
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
        return Slot(self, num_prompts)

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str) -> None:
        """The engine's own input checks (yun/engine/inputs.py), made before the response
        starts (so a stream never has to report them after its 200)."""
        try:
            check_prompt(ids, params, self.vocab_size, self.engine.max_model_len, param)
        except InvalidParam as e:
            raise bad_request(str(e), e.param) from e

    async def check_guided(self, spec: GuidedDecoding, param: str | None) -> Any:
        """Compile the output constraint now, in a worker thread (a 400 naming the problem
        if it is invalid), so the engine loop never waits on it. Returns the compiled
        grammar for `Job.grammar`: the engine takes it without looking it up again."""
        try:
            return await run_in_threadpool(self.engine.compile_grammar, spec)
        except ValueError as e:
            raise bad_request(str(e), param) from e

    # ---- generations -------------------------------------------------------------------
    async def generate(self, job: Job, arrival: float) -> AsyncIterator[RequestOutput]:
        """engine.generate with input errors as 400, a stopped engine as 503, and metrics.
        Yields DELTA outputs (what is new); `job.total` holds their sum. Closing it early
        aborts the request in the engine at once."""
        first_token: float | None = None
        last: RequestOutput | None = None
        status = "cancelled"  # unless it ends or fails (below)
        if job.meter is not None:
            job.meter.job_started()
        try:
            if job.params.output_kind is not RequestOutputKind.DELTA:
                raise RuntimeError("a job's params must ask for DELTA outputs (built by "
                                   "the input processor with output_kind=DELTA)")
            stream = self.engine.generate(job.prompt_ids, job.params, job.request_id,
                                          job.prompt_text, job.grammar)
            try:
                async for out in stream:
                    if first_token is None and any(c.token_ids for c in out.outputs):
                        first_token = time.perf_counter()
                    last = job.total = accumulate(job.total, out)
                    yield out
            finally:
                await stream.aclose()
            status = "completed" if last is not None and last.finished else "failed"
        except InvalidParam as e:  # the engine's checks, should one not have run here
            status = "failed"
            raise bad_request(str(e), e.param) from e
        except ValueError as e:
            status = "failed"
            raise bad_request(str(e)) from e
        except APIError:
            status = "failed"
            raise
        except Exception as e:
            status = "failed"
            if self.draining:
                raise APIError(503, "the server is shutting down") from e
            if not self.engine.is_alive or isinstance(e, EngineDeadError):
                raise APIError(503, str(e)) from e  # e.g. the replica running it died
            raise
        finally:
            self._record(last, job, arrival, first_token)
            if job.meter is not None:
                self._meter(job, last, status, None if first_token is None
                            else first_token - arrival)
        if job.meter is not None:  # the usage record is written before the final response
            try:
                await job.meter.written()
            except Exception as e:
                raise APIError(503, "the usage record could not be written; the request "
                               "is not billed") from e

    @staticmethod
    def _meter(job: Job, last: RequestOutput | None, status: str, ttft: float | None) -> None:
        completion = 0
        if last is not None and job.bills_output:
            completion = sum(len(c.token_ids) for c in last.outputs)
        cached = last.num_cached_tokens if last is not None else 0
        job.meter.job_ended(status, len(job.prompt_ids) if last is not None else 0,  # type: ignore[union-attr]
                            cached, completion, ttft)

    def _record(self, last: RequestOutput | None, job: Job, arrival: float,
                first_token: float | None) -> None:
        reasons = [c.finish_reason or "abort" for c in last.outputs] if last else ["abort"]
        tokens = sum(len(c.token_ids) for c in last.outputs) if last else 0
        self.metrics.observe_finished(
            prompt_tokens=len(job.prompt_ids), output_tokens=tokens, finish_reasons=reasons,
            ttft=None if first_token is None else first_token - arrival,
            e2e=time.perf_counter() - arrival)

    def stream_all(self, jobs: list[Job], arrival: float
                   ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(job index, output) as outputs come, from all jobs at once."""
        return merge([self.generate(j, arrival) for j in jobs])

    async def run_all(self, jobs: list[Job], arrival: float) -> list[RequestOutput]:
        """The final output of every job (all it generated)."""
        async for _ in self.stream_all(jobs, arrival):
            pass
        finals = [j.total for j in jobs]
        if any(f is None or not f.finished for f in finals):
            raise APIError(503, "the engine stopped before the request finished")
        return finals  # type: ignore[return-value]

    async def respond(self, raw: Request, slot: Slot,
                      work: Awaitable[dict[str, Any]]) -> Response:
        """A plain JSON response; the work is cancelled (and aborted) if the client leaves."""
        try:
            body = await unless_disconnected(raw, work)
        except ClientGone:
            return Response(status_code=499)
        finally:
            slot.release()
        return JSONResponse(body)

    # ---- tokenizer endpoints -----------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            text, ids = await run_in_threadpool(render_chat, self.tokenizer, req.messages,
                                                req.add_generation_prompt is not False)
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
