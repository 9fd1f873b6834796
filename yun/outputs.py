"""What the engine hands back: small data objects, no logic."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token's log-probability under the model (before sampling transforms)."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# Per position: {token_id: Logprob} holding the chosen token and the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[PositionLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one prompt's request: every completion so far.

    Each one is cumulative: `outputs[i].text` and `outputs[i].token_ids` hold everything
    generated so far; a streaming consumer keeps what it sent and sends the rest.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
