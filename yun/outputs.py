"""What the engine hands back: small data objects (and how DELTA outputs add up)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request holds (`SamplingParams.output_kind`).

    CUMULATIVE: everything generated so far (each output supersedes the last).
    DELTA: only what is new since the request's previous output (text, token ids,
    logprobs); prompt logprobs come with the first output only. Streaming servers ask for
    this: nothing is copied or sliced twice.
    FINAL_ONLY: one output, when the request finishes, holding everything (as CUMULATIVE's
    last). The offline `LLM` API asks for this.
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


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
    """One prompt's request: its completions, as its `output_kind` says.

    CUMULATIVE (the default) and FINAL_ONLY: `outputs[i].text`, `.token_ids` and
    `.logprobs` hold everything generated so far. DELTA: they hold only what is new since
    the previous output (possibly nothing, for a completion of `n` that did not move);
    `finish_reason` is set on the output that ends the completion. `merge` folds a later
    delta into this one (a consumer that fell behind).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # the request's output_kind

    def merge(self, later: "RequestOutput") -> None:
        """Fold `later`, the next DELTA output of the same request, into this one."""
        for mine, new in zip(self.outputs, later.outputs):
            mine.text += new.text
            mine.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                mine.logprobs = (mine.logprobs or []) + new.logprobs
            mine.finish_reason, mine.stop_reason = new.finish_reason, new.stop_reason
        self.finished = later.finished
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.num_cached_tokens = later.num_cached_tokens
        self.metrics = {**self.metrics, **later.metrics}


def accumulate(total: RequestOutput | None, out: RequestOutput) -> RequestOutput:
    """The request's output so far, given the previous total and the next output: a DELTA
    output is added to (a copy of, the first time) the total; any other kind replaces it."""
    if out.kind is not RequestOutputKind.DELTA:
        return out
    if total is None:
        return replace(out, outputs=[
            replace(c, token_ids=list(c.token_ids),
                    logprobs=None if c.logprobs is None else list(c.logprobs))
            for c in out.outputs])
    total.merge(out)
    return total
