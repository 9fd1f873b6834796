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
import yun.layers.decode_plan as decode_plan
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
    kernels, quant = runner.backend.bf16, runner.backend.quant
    if kernels is None and quant is None:
        raise SystemExit("neither native bf16 nor quantized kernels are in use (dtype, CPU "
                         "or build)")

    def rows_kind(rows: int, n: int) -> str:
        kind = "gemv (<= 4 rows)" if rows <= linear.SKINNY_MAX_ROWS else (
            "gemm 5-64 rows" if rows <= 64 else "gemm > 64 rows")
        return ("vocabulary head, " + kind) if n > 40_000 else kind

    if kernels is not None:
        few, many = kernels

        def matmul(x, w, b):
            rows = x.shape[0]
            fn = few if rows <= linear.SKINNY_MAX_ROWS else many
            return timed(rows_kind(rows, w.shape[0]), fn)(x, w, b)

        runner.backend = dataclasses.replace(runner.backend, bf16=(matmul, matmul))
    if quant is not None:  # the integer kernels, and the many-row GEMM after dequantizing
        module = quant.module

        class Timed:
            def matmul(self, x, w, qtype, k, *rest):
                name = f"quantized {rows_kind(x.shape[0], w.shape[0])}, integer kernels"
                return timed(name, module.matmul)(x, w, qtype, k, *rest)

            def dequantize_bf16(self, *a):
                return timed("  of which dequantize to bf16", module.dequantize_bf16)(*a)

            def __getattr__(self, name):
                return getattr(module, name)

        def many_rows(mod, x, data, *rest):
            name = f"quantized {rows_kind(x.shape[0], data.shape[0])}, dequantize + GEMM"
            return timed(name, quant.many_rows)(mod, x, data, *rest)

        runner.backend = dataclasses.replace(runner.backend, quant=dataclasses.replace(
            quant, module=Timed(), many_rows=many_rows if quant.many_rows else None))
        decode_plan.run_layers = timed("decode plan (whole native steps)", decode_plan.run_layers)
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
