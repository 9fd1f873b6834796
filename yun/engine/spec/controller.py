"""How many tokens to propose: measured acceptance against measured step cost.

Each verified proposal costs one more token in the step's forward pass; it pays only when
the tokens it is expected to add are worth more than that. The controller keeps

- the step time as a line t(T) = a + b * T in the step's token count T, fitted by least
  squares with forgetting over the steps that ran (prefills, decodes, verifications), so
  `b` is the price of one more token and `a` the per-step overhead;
- each request's acceptance rate (an exponential moving average of its verified
  proposals, starting from `PRIOR_ACCEPTANCE`).

- the proposer's time per proposed position (a draft model runs one forward per
  position, shared by the sequences that propose; the n-gram lookup costs ~nothing), an
  exponential moving average `c` of its measured time over the most proposals it made.

A request's j-th proposal is accepted only when the ones before it are, with probability
about acc^j; it is worth proposing when acc^j times the time a committed token costs
today (the step time per decoding sequence) exceeds `b` plus its share of `c` (a draft
as slow as the target never pays, even when all its proposals are accepted). At batch 1 a step is mostly
per-step overhead and weight reads (a >> b) and several proposals pay; with many
sequences the step is bound by its tokens (time per sequence ~ b) and speculation
switches itself off. It also counts proposed / accepted tokens per position (metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_ACCEPTANCE = 0.6  # a new request's acceptance rate, before any of its proposals ran
ACCEPTANCE_DECAY = 0.3  # weight of the newest verified proposal in a request's rate
TIME_FORGET = 0.97  # per step: how much the step-time fit remembers of older steps
MIN_STEPS_FOR_FIT = 8  # before this many steps, assume a token costs PRIOR_TOKEN_COST * a
PRIOR_TOKEN_COST = 0.1
RECOVERY = 0.05  # per step without proposals, a request's rate drifts back to the prior
PROPOSER_DECAY = 0.3  # weight of the newest measurement in the proposer's cost


@dataclass
class SpecStats:
    """Counters since the engine started, per proposal position (0 = the first)."""

    num_steps: int = 0  # verification steps (steps with at least one proposal)
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    proposer_seconds: float = 0.0  # time spent proposing (a draft model's forwards)
    num_proposer_steps: int = 0  # steps in which the proposer was asked for tokens

    @property
    def num_proposed(self) -> int:
        return sum(self.proposed)

    @property
    def num_accepted(self) -> int:
        return sum(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    def record(self, num_proposed: int, num_accepted: int) -> None:
        grow = num_proposed - len(self.proposed)
        if grow > 0:
            self.proposed += [0] * grow
            self.accepted += [0] * grow
        for j in range(num_proposed):
            self.proposed[j] += 1
            self.accepted[j] += j < num_accepted


class _LineFit:
    """Weighted least squares of y = a + b * x, older points fading by `forget` per point."""

    def __init__(self, forget: float):
        self.forget = forget
        self.n = 0
        self.s = [0.0] * 5  # sum w, w x, w x^2, w y, w x y

    def add(self, x: float, y: float) -> None:
        f = self.forget
        s = self.s
        self.s = [f * s[0] + 1, f * s[1] + x, f * s[2] + x * x, f * s[3] + y, f * s[4] + x * y]
        self.n += 1

    def line(self) -> tuple[float, float] | None:
        """(a, b), or None while the points do not pin a slope."""
        w, sx, sxx, sy, sxy = self.s
        if self.n < MIN_STEPS_FOR_FIT or w <= 0:
            return None
        var = sxx / w - (sx / w) ** 2
        if var < 0.25:  # (nearly) one token count only: no slope to read
            return None
        b = (sxy / w - sx / w * sy / w) / var
        a = sy / w - b * sx / w
        return max(a, 0.0), max(b, 0.0)

    def mean_time(self) -> float:
        return self.s[3] / self.s[0] if self.s[0] else 0.0

    def mean_tokens(self) -> float:
        return self.s[1] / self.s[0] if self.s[0] else 1.0


class SpecController:
    def __init__(self, max_proposals: int, adaptive: bool = True):
        self.max_proposals = max_proposals
        self.adaptive = adaptive  # False: always propose max_proposals (tests)
        self.stats = SpecStats()
        self._acceptance: dict[str, float] = {}
        self._time = _LineFit(TIME_FORGET)
        self.proposer_cost = 0.0  # seconds per proposed position (all sequences together)

    # ---- decisions -------------------------------------------------------------------
    def token_cost(self) -> tuple[float, float]:
        """(per-step overhead a, per-token cost b) of the fitted step time, in seconds."""
        fit = self._time.line()
        if fit is not None:
            return fit
        mean = self._time.mean_time() or 1.0  # no data: only the ratio b / a matters
        tokens = self._time.mean_tokens()
        a = mean / (1 + PRIOR_TOKEN_COST * tokens)
        return a, PRIOR_TOKEN_COST * a

    def num_proposals(self, request_id: str, num_decoding: int, step_tokens: int) -> int:
        """How many tokens to propose for one request, in a step where `num_decoding`
        sequences decode and `step_tokens` tokens are scheduled without proposals."""
        if not self.adaptive:
            return self.max_proposals
        a, b = self.token_cost()
        per_token = (a + b * step_tokens) / max(1, num_decoding)  # time of a committed token
        cost = b + self.proposer_cost / max(1, num_decoding)  # of one more proposal
        acc = self._acceptance.get(request_id, PRIOR_ACCEPTANCE)
        k, gain = 0, 1.0
        while k < self.max_proposals:
            gain *= acc  # the chance that this proposal is reached and accepted
            if gain * per_token <= cost:
                break
            k += 1
        if k == 0 and acc < PRIOR_ACCEPTANCE:  # a bad stretch is forgotten slowly: retry
            self._acceptance[request_id] = acc + RECOVERY * (PRIOR_ACCEPTANCE - acc)
        return k

    # ---- measurements ----------------------------------------------------------------
    def observe_step(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            self._time.add(num_tokens, seconds)

    def observe_proposer(self, num_positions: int, seconds: float) -> None:
        """The proposer took `seconds` for proposals up to `num_positions` deep."""
        if num_positions > 0 and seconds >= 0:
            c = seconds / num_positions
            self.proposer_cost += PROPOSER_DECAY * (c - self.proposer_cost) \
                if self.proposer_cost else c

    def set_proposer_cost(self, seconds_per_position: float) -> None:
        """The proposer measured its own cost per proposed position."""
        self.proposer_cost = max(0.0, seconds_per_position)

    def observe_verification(self, request_id: str, num_proposed: int,
                             num_accepted: int) -> None:
        if num_proposed <= 0:
            return
        self.stats.record(num_proposed, num_accepted)
        acc = self._acceptance.get(request_id, PRIOR_ACCEPTANCE)
        for j in range(min(num_accepted + 1, num_proposed)):  # positions that were tried
            acc += ACCEPTANCE_DECAY * (float(j < num_accepted) - acc)
        self._acceptance[request_id] = acc

    def release(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
