"""Where one decode step's time goes at batch 1: wall-clock timers around the engine's
stages (schedule, runner metadata, forward, head, sampling, scheduler update,
detokenization) and around the quantized matmul kernels, over one greedy request on the
default model (or --model). Native kernels are opaque to torch.profiler, hence timers.

    PYTHONPATH=$PWD .venv/bin/python scripts/profile_decode.py --threads 1 --steps 128
"""

from __future__ import annotations

import argparse
import collections
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from yun import LLM, SamplingParams

Timers = tuple[collections.defaultdict[str, float], collections.Counter[str]]


CLOCK = time.perf_counter  # --clock cpu: this thread's CPU time (steadier on a busy machine)


def timed(timers: Timers, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    seconds, calls = timers

    def run(*a: Any, **k: Any) -> Any:
        t = CLOCK()
        out = fn(*a, **k)
        seconds[name] += CLOCK() - t
        calls[name] += 1
        return out
    return run


class _TimedKernels:
    """Stands in for the quantized extension module: times its matmul calls."""

    def __init__(self, module: Any, timers: Timers):
        self._module = module
        self.matmul = timed(timers, "quantized matmul kernels", module.matmul)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def instrument(llm: LLM, timers: Timers) -> None:
    eng = llm.engine
    runner = eng.runner
    eng.scheduler.schedule = timed(timers, "scheduler.schedule", eng.scheduler.schedule)
    eng.scheduler.update = timed(timers, "scheduler.update", eng.scheduler.update)
    runner.prepare = timed(timers, "runner.prepare (metadata)", runner.prepare)
    runner.run_model = timed(timers, "model forward (all layers)", runner.run_model)
    runner.model.compute_logits = timed(timers, "lm head (compute_logits)",
                                        runner.model.compute_logits)
    runner.sampler = timed(timers, "sampler", runner.sampler)
    runner.execute = timed(timers, "runner.execute (all)", runner.execute)
    # The runner's forward passes run on its backend: time the kernels it holds.
    b = runner.backend
    runner.backend = replace(
        b, decode=None if b.decode is None else timed(timers, "decode attention kernel", b.decode),
        quant=None if b.quant is None else replace(b.quant, module=_TimedKernels(b.quant.module,
                                                                                  timers)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--kernel-isa", default="auto", choices=("auto", "avx512", "avx2"),
                    help="the native build to run (as yun's --kernel-isa)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or this thread's CPU time (with --threads 1: "
                         "less disturbed by other processes on a shared machine)")
    ap.add_argument("--no-decode-plan", action="store_true",
                    help="run the layers from Python (the reference path), not through "
                         "yun/layers/decode_plan.py's one native call per step")
    ap.add_argument("--torch-profile", action="store_true",
                    help="also print torch.profiler's table of ops over 32 decode steps")
    args = ap.parse_args()

    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    llm = LLM(args.model, num_threads=args.threads, max_model_len=2048,
              kernel_isa=args.kernel_isa)
    eng = llm.engine
    eng.runner.model.use_decode_plan = not args.no_decode_plan
    prompt = [(7 * i + 13) % 5000 + 100 for i in range(args.prompt_len)]
    eng.add_request("p", prompt, SamplingParams(max_tokens=args.steps + 40, ignore_eos=True,
                                                temperature=0.0))
    for _ in range(8):  # prefill + warm-up decodes
        eng.step()
    timers: Timers = (collections.defaultdict(float), collections.Counter())
    instrument(llm, timers)
    step = timed(timers, "engine.step (all)", eng.step)
    t0 = CLOCK()
    for _ in range(args.steps):
        step()
    total = CLOCK() - t0
    seconds, calls = timers
    n = args.steps
    print(f"{n} decode steps, {args.threads} thread(s), {args.clock} clock: {1e3 * total / n:.2f} ms/step "
          f"({n / total:.1f} tok/s)")
    for name in sorted(seconds, key=seconds.get, reverse=True):
        print(f"  {name:32s} {1e3 * seconds[name] / n:7.3f} ms/step  "
              f"{calls[name] / n:6.1f} calls/step")
    outside = seconds["engine.step (all)"] - seconds.get("quantized matmul kernels", 0.0)
    print(f"  {'outside the matmul kernels':32s} {1e3 * outside / n:7.3f} ms/step")
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(32):
                eng.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
