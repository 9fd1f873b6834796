"""Where a workload's time goes, by kernel: wall-clock timers around the matmuls (split by
rows per call), attention, the vocabulary head and the whole step, over a run of a
`yun bench` workload through the offline engine. Native kernels are opaque to
torch.profiler (they are not dispatcher ops), hence plain timers.

    .venv/bin/python scripts/profile_steps.py --workload mixed --num-requests 64
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

from yun import LLM, SamplingParams
from yun.bench.workloads import WorkloadOptions, make_workload
import yun.layers.attention as attention
import yun.layers.linear as linear
import yun.models.llama as llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None, help="HF folder or GGUF file (default: yun's)")
    ap.add_argument("--num-threads", type=int, default=None)
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, num_threads=args.num_threads)
    workload = make_workload(args.workload, WorkloadOptions(
        num_requests=args.num_requests, scale=args.scale,
        vocab_size=llm.engine.model_config.vocab_size))
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            seconds[name] += time.perf_counter() - t
            calls[name] += 1
            return out
        return run

    runner = llm.engine.runner
    kernels = runner.backend.bf16
    if kernels is None:
        raise SystemExit("native bf16 kernels are not in use (dtype, CPU or build)")
    few, many = kernels

    def matmul(x, w, b):
        rows = x.shape[0]
        kind = "gemv (<= 4 rows)" if rows <= linear.SKINNY_MAX_ROWS else (
            "gemm 5-64 rows" if rows <= 64 else "gemm > 64 rows")
        if w.shape[0] > 100_000:
            kind = "vocabulary head, " + kind
        return timed(kind, few if rows <= linear.SKINNY_MAX_ROWS else many)(x, w, b)

    runner.backend = dataclasses.replace(runner.backend, bf16=(matmul, matmul))
    llama.qkv_attention = timed("attention (rotary, cache write, attention)",
                                attention.qkv_attention)
    attention.paged_attention = timed("  of which paged_attention", attention.paged_attention)
    decode_attention = runner.backend.decode
    if decode_attention is not None:
        runner.backend = dataclasses.replace(runner.backend, decode=timed(
            "    of which native decode attention", decode_attention))
    runner.execute = timed("step (model + head + sampling)", runner.execute)
    for _, requests in workload.phases():
        for i, r in enumerate(requests):
            llm.engine.add_request(f"p{i}", r.prompt_token_ids, SamplingParams(
                max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0))
    t0 = time.perf_counter()
    steps = 0
    while llm.engine.has_unfinished():
        llm.engine.step()
        steps += 1
    total = time.perf_counter() - t0
    print(f"{workload.name}: {total:.1f} s, {steps} steps")
    for name in sorted(seconds, key=seconds.get, reverse=True):
        print(f"  {name:34s} {seconds[name]:8.2f} s  {100 * seconds[name] / total:5.1f}%"
              f"  {calls[name]:6d} calls")


if __name__ == "__main__":
    main()
