"""The engine's speculative decoding: ask the proposer for tokens before each step, learn
from each verification. The proposals ride on the requests (`draft_token_ids`); the
scheduler fits them into the step and the runner verifies them (spec/verify.py)."""

from __future__ import annotations

from typing import Protocol

from yun.engine.request import Request
from yun.engine.scheduler import RunnerOutput, SchedulerOutput
from yun.engine.spec.controller import SpecController, SpecStats


class Proposer(Protocol):
    def propose(self, req: Request, k: int) -> list[int]:
        """Up to k tokens that may follow the request's tokens."""
        ...

    def release(self, request_id: str) -> None: ...


class Speculator:
    def __init__(self, proposer: Proposer, max_proposals: int, adaptive: bool = True):
        self.proposer = proposer
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
        for r in decoding:
            k = self.controller.num_proposals(r.request_id, len(decoding), step_tokens)
            if k:
                r.draft_token_ids = self.proposer.propose(r, k)

    def observe(self, sched: SchedulerOutput, result: RunnerOutput, seconds: float) -> None:
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
