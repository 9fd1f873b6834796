"""`yun bench throughput`: a workload through yun's offline engine (`yun.LLM`).

All requests of a phase are submitted at once (a sweep level keeps `concurrency` in
flight instead, adding a request as one finishes), with exact output lengths
(`ignore_eos`), greedy or seeded sampling. We drive `llm.engine.step()` ourselves, as
`LLM.generate` does, so that each request's finish time and token arrivals are seen.
TTFT comes from the outputs' metrics (`arrival_time`, `first_token_time`, monotonic).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass

from yun.bench.metrics import RequestRecord, RunResult, decode_tokens_per_s, gaps
from yun.bench.workloads import BenchRequest, Workload
from yun.sampling_params import SamplingParams

STALL_STEPS = 10_000  # empty steps in a row before we call the engine stuck


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0  # request i samples with seed + i when temperature > 0

    def params(self, request: BenchRequest, index: int) -> SamplingParams:
        seed = self.seed + index if self.temperature > 0 else None
        return SamplingParams(max_tokens=request.max_tokens, ignore_eos=True,
                              temperature=self.temperature, seed=seed)


@dataclass
class _Live:
    sent: float
    token_times: list[float]
    record: RequestRecord


def warm_up(engine, num_prompt_tokens: int = 16, num_tokens: int = 4) -> None:
    """One short request, so one-time costs (allocations, kernel selection) are not timed."""
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True, temperature=0.0)
    rid = "bench-warmup"
    engine.add_request(rid, [(7 * i + 11) % 1000 for i in range(num_prompt_tokens)], params)
    while engine.has_unfinished():
        engine.step()


def run_phase(engine, requests: list[BenchRequest], concurrency: int | None,
              sampling: SamplingOptions, system: str = "yun", workload: str = "",
              progress: bool = False) -> RunResult:
    """Run `requests` on an LLMEngine; `concurrency=None` submits them all at once."""
    from tqdm.auto import tqdm

    records = [RequestRecord(prompt_tokens=r.num_prompt_tokens) for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    queue = deque(range(len(requests)))
    live: dict[str, _Live] = {}
    limit = concurrency or len(requests)
    bar = tqdm(total=len(requests), desc=f"{system} {workload}", unit="req", disable=not progress)
    t0 = time.monotonic()

    def submit() -> None:
        while queue and len(live) < limit:
            i = queue.popleft()
            rid = f"bench-{i}"
            sent = time.monotonic()
            records[i].start = sent - t0
            try:
                engine.add_request(rid, requests[i].prompt_token_ids,
                                   sampling.params(requests[i], i))
            except ValueError as e:
                records[i].error = str(e)
                bar.update(1)
                continue
            live[rid] = _Live(sent, [], records[i])

    submit()
    stalled = 0
    while live:
        outs = engine.step()
        now = time.monotonic()
        stalled = 0 if outs else stalled + 1
        if stalled > STALL_STEPS:
            raise RuntimeError(f"the engine made no progress for {STALL_STEPS} steps")
        for out in outs:
            item = live.get(out.request_id)
            if item is None:
                continue
            n = len(out.outputs[0].token_ids)
            item.token_times.extend([now] * (n - len(item.token_times)))
            if out.finished:
                outputs[int(out.request_id.split("-")[1])] = list(out.outputs[0].token_ids)
                _finish(item, out, now)
                del live[out.request_id]
                bar.update(1)
        submit()
    bar.close()
    result = RunResult(system=system, workload=workload, duration=time.monotonic() - t0,
                       records=records, concurrency=concurrency)
    # The outputs' fingerprint: two runs with the same one produced the same tokens.
    result.extra["output_sha256"] = hashlib.sha256(repr(outputs).encode()).hexdigest()[:16]
    return result


def _finish(item: _Live, out, now: float) -> None:
    rec = item.record
    rec.output_tokens = len(out.outputs[0].token_ids)
    rec.e2e = now - item.sent
    m = out.metrics
    if "first_token_time" in m and "arrival_time" in m:
        rec.ttft = m["first_token_time"] - m["arrival_time"]
    elif item.token_times:
        rec.ttft = item.token_times[0] - item.sent
    rec.itls = gaps(item.token_times)
    if out.outputs[0].finish_reason not in ("length", "stop"):
        rec.error = f"finished with {out.outputs[0].finish_reason!r}"


def run_yun(llm, workload: Workload, sampling: SamplingOptions,
            progress: bool = True) -> list[RunResult]:
    """Every phase of `workload` on `llm` (a `yun.LLM`), after one warm-up request."""
    warm_up(llm.engine)
    results = []
    spec = llm.engine.speculator
    system = "yun" if spec is None else f"yun ({llm.config.speculative_method} speculation)"
    for concurrency, requests in workload.phases():
        before = spec_counts(llm.engine)
        res = run_phase(llm.engine, requests, concurrency, sampling, system, workload.name,
                        progress)
        if workload.name in ("single", "edit"):
            res.extra["decode_tokens_per_s"] = decode_tokens_per_s(res)
        if spec is not None:
            res.extra["speculative"] = spec_summary(before, spec_counts(llm.engine))
        results.append(res)
    return results


def spec_counts(engine) -> tuple[int, list[int], list[int], float, int]:
    """(verification steps, proposed and accepted tokens per position, proposer seconds,
    steps that proposed) so far."""
    if engine.speculator is None:
        return 0, [], [], 0.0, 0
    s = engine.speculator.stats
    return (s.num_steps, list(s.proposed), list(s.accepted), s.proposer_seconds,
            s.num_proposer_steps)


def spec_summary(before, after) -> dict:
    """Speculative decoding during a phase: tokens proposed and accepted, per position."""
    n = len(after[1])
    pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
    proposed = [a - b for a, b in zip(after[1], pad(before[1]))]
    accepted = [a - b for a, b in zip(after[2], pad(before[2]))]
    seconds, steps = after[3] - before[3], after[4] - before[4]
    return {"proposed": sum(proposed), "accepted": sum(accepted),
            "verification_steps": after[0] - before[0],
            "proposer_seconds": round(seconds, 4),
            "proposer_ms_per_step": round(1000 * seconds / steps, 3) if steps else 0.0,
            "acceptance_rate": sum(accepted) / sum(proposed) if sum(proposed) else 0.0,
            "acceptance_by_position": [round(a / p, 3) if p else 0.0
                                       for a, p in zip(accepted, proposed)],
            "proposed_by_position": proposed}
