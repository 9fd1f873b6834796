"""Continuous batching: which requests compute which tokens this step.

There is no prefill or decode phase, only tokens to compute. Each step the running
requests go first (oldest first), then waiting ones are admitted while the token
budget, the sequence limit and the KV cache allow. When blocks run out, the most
recently admitted request is preempted: its blocks are freed and it waits to be
recomputed. Priorities (yun/engine/priority.py) reorder both: the highest-ranked
request is admitted and scheduled first, the lowest-ranked preempted first. This module
imports no torch.

Speculative decoding: a decoding request may carry proposed tokens (`draft_token_ids`,
set by the engine's proposer before `schedule`); they are scheduled as extra tokens of
its step (within the token budget, the KV cache, `max_tokens` and the context length),
and `update` keeps the ones the runner verified, rolling the rest back (their KV slots
are recomputed later; blocks past the kept tokens are freed).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from yun.engine import priority
from yun.engine.kv_cache import KVCacheManager
from yun.engine.kv_groups import HybridKVCacheManager
from yun.engine.request import Request, RequestStatus
from yun.outputs import PositionLogprobs


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    priority_aging_s: float = 30.0  # a waiting request gains one priority level per period


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, from request.num_computed_tokens on
    start: int  # = request.num_computed_tokens when scheduled
    # Proposed tokens verified this step: the last len(draft) of the num_new_tokens.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens (so a token is sampled)."""
        return self.start + self.num_new_tokens - len(self.draft_token_ids) == \
            self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    """What the model runner produced for one step, keyed by request id.

    `sampled`: the tokens the step commits, in order: one, or with proposals the accepted
    ones and then the sampled one; `logprobs`: one entry per committed token.
    """

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # Prompt logprobs computed this step (one entry per prompt position in the chunk).
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager | HybridKVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.clock = time.monotonic  # for ageing priorities; tests may replace it

    # ---- request lifecycle -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stop, length or abort) and free its blocks at once."""
        if req.is_finished:
            return
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free_request(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = self.clock()
        priority.order_running(self.running, now, self.config.priority_aging_s)
        made_room = self._make_room(out, now)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            draft = self._fit_draft(req, n, budget)
            if draft and not self.kv.allocate(req, n + len(draft)):
                draft = []  # no room for proposals: plain decode (or preempt, as ever)
            elif draft:
                out.scheduled.append(ScheduledRequest(req, n + len(draft),
                                                      req.num_computed_tokens, draft))
                budget -= n + len(draft)
                i += 1
                continue
            while not self.kv.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens))
                budget -= n
                i += 1
        if len(out.preempted) == made_room:  # no KV pressure this step
            self._admit(out, budget)
        return out

    def _make_room(self, out: SchedulerOutput, now: float) -> int:
        """When every slot is taken, preempt the lowest-ranked running requests for
        waiting ones of a strictly higher rank (yun/engine/priority.py). Returns how many."""
        count, aging = 0, self.config.priority_aging_s
        waiting = sorted(self.waiting, key=lambda r: -priority.rank(r, now, aging))
        for best in waiting:
            if len(self.running) < self.config.max_num_seqs or not self.running:
                break
            victim = self.running[-1]
            if priority.rank(best, now, aging) <= priority.rank(victim, now, aging):
                break
            self._preempt(victim)
            out.preempted.append(victim)
            count += 1
        return count

    def _fit_draft(self, req: Request, n: int, budget: int) -> list[int]:
        """The request's proposals that fit this step: only when it decodes one token, and
        never past the budget, max_tokens (k proposals can commit k + 1 tokens) or the
        context length."""
        draft = req.draft_token_ids
        if not draft or n != 1:
            return []
        room = min(budget - 1, req.max_tokens - req.num_output_tokens - 1,
                   self.config.max_model_len - req.num_tokens)
        return draft[:max(0, room)]

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        now = self.clock()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = priority.next_waiting(self.waiting, now, self.config.priority_aging_s)
            hits = self.kv.find_cached_prefix(req)
            num_cached = len(hits) * self.kv.block_size
            n = req.num_tokens - num_cached
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not self.kv.allocate(req, n, hits):
                break
            self.waiting.remove(req)
            self.kv.record_lookup(req.num_tokens, num_cached)
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, num_cached))
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free_request(req)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Advance progress, append sampled tokens, finish on EOS / stop ids / length.

        Returns the requests that received a new token this step. Stop strings are the
        detokenizer's business: the engine calls `finish` when one matches.
        """
        changed: list[Request] = []
        for s in out.scheduled:
            req = s.request
            req.draft_token_ids = []
            if req.is_finished:  # aborted while the step ran
                continue
            tokens = result.sampled.get(req.request_id) or []
            if isinstance(tokens, int):  # a single token is taken too
                tokens = [tokens]
            rejected = len(s.draft_token_ids) - max(0, len(tokens) - 1)
            req.num_computed_tokens = s.start + s.num_new_tokens - rejected
            if rejected:  # their KV slots are overwritten later; whole blocks go back now
                self.kv.free_tail(req)
            self.kv.cache_full_blocks(req)
            self.kv.free_outside_window(req)
            if req.request_id in result.prompt_logprobs:
                req.prompt_logprobs.extend(result.prompt_logprobs[req.request_id])
            if not tokens:
                continue
            lps = result.logprobs.get(req.request_id)
            changed.append(req)
            for j, token in enumerate(tokens):
                req.output_token_ids.append(token)
                if req.grammar is not None:  # guided decoding: advance the grammar
                    req.grammar.accept(token)
                if lps:
                    req.logprobs.append(lps[j])
                status = self._check_stop(req, token)
                if status is not None:  # tokens after a stop are dropped
                    self.finish(req, status)
                    break
        return changed

    @staticmethod
    def _check_stop(req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if req.grammar is not None and req.grammar.terminated:  # guided: the grammar ended
            req.stop_reason = token if token in p.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in p._eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
