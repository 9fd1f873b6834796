"""One sequence's state inside the engine: tokens, progress and KV blocks.

One vocabulary of tokens: a request has `num_tokens` (prompt + output so far) and
`num_computed_tokens` (how many of them are in the KV cache). The scheduler hands out
tokens to compute; prefill, chunked prefill and decode are the same path.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from yun.outputs import PositionLogprobs
from yun.sampling_params import SamplingParams

if TYPE_CHECKING:
    from yun.engine.guided import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, KV freed, will recompute
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never more than the context allows
    seed: int  # resolved per-request seed (the user's, or one drawn by the engine)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    block_ids: list[int] = field(default_factory=list)
    # A model with sliding and full layers (yun/engine/kv_groups.py): the sliding group's
    # block table (FREED outside the window); block_ids is then the full group's.
    window_block_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # Logprobs collected by the runner, position by position.
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    first_token_time: float | None = None
    # Guided decoding: the grammar's state, advanced by the scheduler with each new token.
    grammar: "GrammarState | None" = None
    # Speculative decoding: tokens proposed for the next step (set by the engine's
    # proposer, trimmed and verified by the scheduler and runner, then cleared).
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
