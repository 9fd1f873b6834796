"""What one benchmark run measured: per-request timings and their summary.

Every system (yun offline, an HTTP server, a transformers baseline) fills the same
`RequestRecord`s, so the summaries and ratios compare like with like. Times are seconds.

    TTFT  time to first token: request sent -> first output token seen
    TPOT  time per output token after the first: (E2E - TTFT) / (output tokens - 1)
    ITL   inter-token latency: gap between consecutive token arrivals (one per token
          where the system reports tokens one by one, per chunk over HTTP)
    E2E   request sent -> last token seen
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0  # seconds since the run began, when the request was sent
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)  # type: ignore[operator]


@dataclass
class RunResult:
    """One system on one workload phase (a sweep has one per concurrency level)."""

    system: str  # e.g. "yun", "transformers (generate, static batches of 16)", "llama.cpp"
    workload: str
    duration: float  # first request sent -> last request done
    records: list[RequestRecord]
    concurrency: int | None = None  # None: all requests submitted at once (or a rate)
    request_rate: float | None = None  # requests/s of a Poisson arrival process
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. decode_tokens_per_s, notes

    @property
    def completed(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def num_errors(self) -> int:
        return sum(not r.ok for r in self.records)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.completed)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.completed)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.completed) / self.duration if self.duration > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        done = self.completed
        itls = [x for r in done for x in r.itls]
        return {
            "system": self.system, "workload": self.workload,
            "concurrency": self.concurrency, "request_rate": self.request_rate,
            "num_requests": len(self.records), "completed": len(done),
            "errors": self.num_errors, "duration_s": self.duration,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_s": percentiles([r.ttft for r in done if r.ttft is not None]),
            "tpot_s": percentiles([t for r in done if (t := r.tpot) is not None]),
            "itl_s": percentiles(itls),
            "e2e_s": percentiles([r.e2e for r in done if r.e2e is not None]),
            **self.extra,
        }

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "requests": [asdict(r) for r in self.records]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunResult":
        """The inverse of `to_json` (a results file's `runs` entries)."""
        s = data["summary"]
        records = [RequestRecord(**r) for r in data["requests"]]
        base = cls(system=s["system"], workload=s["workload"], duration=s["duration_s"],
                   records=records, concurrency=s.get("concurrency"),
                   request_rate=s.get("request_rate"))
        derived = set(base.summary())
        base.extra = {k: v for k, v in s.items() if k not in derived}
        return base


def percentiles(values: list[float]) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99"}; None for each when there is nothing to summarise."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def gaps(times: list[float]) -> list[float]:
    """Differences between consecutive timestamps."""
    return [b - a for a, b in zip(times, times[1:])]


def decode_tokens_per_s(result: RunResult) -> float | None:
    """Mean over requests of (output tokens - 1) / (E2E - TTFT): decode speed without the
    first token (which prefill produces)."""
    rates = [(r.output_tokens - 1) / (r.e2e - r.ttft) for r in result.completed
             if r.ttft is not None and r.e2e is not None and r.output_tokens > 1
             and r.e2e > r.ttft]
    return sum(rates) / len(rates) if rates else None
