"""The engine's speculative decoding: ask the proposer for tokens before each step, learn
from each verification. The proposals ride on the requests (`draft_token_ids`); the
scheduler fits them into the step and the runner verifies them (spec/verify.py).

Proposers that run a model (a draft model, DeepSeek's MTP layer) propose for the whole
batch at once and see every target step (`ModelProposer`); the n-gram one answers per
request. The time spent proposing is counted (`SpecStats.proposer_seconds`) and, per
proposed position, weighed by the controller against what the proposals bring.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from yun.engine.request import Request
from yun.engine.scheduler import RunnerOutput, SchedulerOutput
from yun.engine.spec.controller import SpecController, SpecStats


class Proposer(Protocol):
    def propose(self, req: Request, k: int) -> list[int]:
        """Up to k tokens that may follow the request's tokens."""
        ...

    def release(self, request_id: str) -> None: ...


@runtime_checkable
class ModelProposer(Protocol):
    # The measured time of one proposer forward of a few tokens per sequence: what one
    # more proposed position costs (a prompt's catch-up prefill is not counted in it).
    seconds_per_position: float

    def propose_batch(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        """Up to ks[i] tokens that may follow reqs[i]'s tokens, for all at once."""
        ...

    def observe_step(self, sched: SchedulerOutput, result: RunnerOutput) -> None:
        """Called after every target step, before the scheduler commits its tokens."""
        ...

    def release(self, request_id: str) -> None: ...


class Speculator:
    def __init__(self, proposer: Proposer | ModelProposer, max_proposals: int,
                 adaptive: bool = True):
        self.proposer = proposer
        self.batched = isinstance(proposer, ModelProposer)
        self.controller = SpecController(max_proposals, adaptive)

    @property
    def stats(self) -> SpecStats:
        return self.controller.stats

    def propose(self, running: list[Request]) -> None:
        """Set `draft_token_ids` on every running request (empty where proposing does
        not pay, or where the request does not decode next)."""
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        step_tokens = sum(r.num_tokens - r.num_computed_tokens for r in running)
        for r in running:
            r.draft_token_ids = []
        ks = [self.controller.num_proposals(r.request_id, len(decoding), step_tokens)
              for r in decoding]
        if not any(ks) and not self.batched:
            return
        t0 = time.perf_counter()
        if self.batched:  # a model proposer also catches up on requests it skips now
            asked = [(r, k) for r, k in zip(decoding, ks) if k]
            found = self.proposer.propose_batch([r for r, _ in asked], [k for _, k in asked])
            for (r, _), tokens in zip(asked, found):
                r.draft_token_ids = tokens
        else:
            for r, k in zip(decoding, ks):
                if k:
                    r.draft_token_ids = self.proposer.propose(r, k)
        seconds = time.perf_counter() - t0
        self.stats.proposer_seconds += seconds
        if any(ks):
            self.stats.num_proposer_steps += 1
            if self.batched:
                self.controller.set_proposer_cost(self.proposer.seconds_per_position)
            else:
                self.controller.observe_proposer(max(ks), seconds)

    def observe(self, sched: SchedulerOutput, result: RunnerOutput, seconds: float) -> None:
        if self.batched:
            self.proposer.observe_step(sched, result)
        self.controller.observe_step(sched.num_tokens, seconds)
        if any(s.draft_token_ids for s in sched.scheduled):
            self.stats.num_steps += 1
        for s in sched.scheduled:
            if s.draft_token_ids:
                kept = result.sampled.get(s.request.request_id) or [None]
                self.controller.observe_verification(s.request.request_id,
                                                     len(s.draft_token_ids), len(kept) - 1)

    def release(self, request_id: str) -> None:
        self.proposer.release(request_id)
        self.controller.release(request_id)
