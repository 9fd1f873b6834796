"""Sampling settings for one request, validated at construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from yun.outputs import RequestOutputKind

GREEDY_BELOW = 1e-5  # temperatures under this are treated as greedy (0)


class InvalidParam(ValueError):
    """Input the engine cannot take, naming the field at fault (`param`: a SamplingParams
    field, or "prompt"); the message starts with what is wrong with it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuidedDecoding:
    """Constrain the output to a language (exactly one kind set); see yun/engine/guided.py.

    `json`: a JSON schema (a dict, or its JSON text); `json_object`: any JSON object;
    `regex`; `choice`: one of these strings; `grammar`: EBNF (GBNF-style, `root ::= ...`).
    `start_after`: token ids after which the constraint starts (e.g. `</think>` when the
    prompt leaves the model inside its reasoning); empty: from the first token.
    Hashable, so compiled grammars are cached by spec.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    start_after: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            object.__setattr__(self, "json", json.dumps(self.json, ensure_ascii=False))
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) for c in choice):
                raise ValueError(f"guided choice must be a non-empty list of strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", choice)
        object.__setattr__(self, "start_after", tuple(self.start_after))
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError("guided decoding takes exactly one of json, json_object, regex, "
                             f"choice, grammar; got {', '.join(kinds) or 'none'}")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar")
                    if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return True if self.json_object else getattr(self, self.kind)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one prompt.

    `temperature == 0` means greedy. `seed` makes sampling reproducible whatever
    else shares the batch. `logprobs=N` returns the chosen token's logprob and the
    top-N; `prompt_logprobs=N` does the same for every prompt token after the first.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    guided: GuidedDecoding | None = None  # constrained decoding (JSON schema, regex, ...)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, [-100, 100]
    # Scheduling class: higher is admitted and scheduled first, preempted last (the server
    # sets it from the tenant's class; yun/engine/priority.py ages it so none starves).
    priority: int = 0
    # What each output holds: everything so far, only what is new, or one final output.
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine from the model's generation config; not user-facing.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidParam:
            return InvalidParam(name, f"{name} {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2**63)")
        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be positive")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        for tok, bias in (self.logit_bias or {}).items():
            if not (isinstance(tok, int) and tok >= 0):
                raise bad("logit_bias", "must map token ids (non-negative integers) to biases")
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise bad("logit_bias", "must map token ids to biases in [-100, 100]")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "must be a RequestOutputKind")
        if not isinstance(self.priority, int):
            raise bad("priority", "must be an integer")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise bad(name, "must be non-negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
