"""Inter-token latency of a running stream while a long prompt is prefilled.

One stream decodes; a long prompt (16k tokens by default) arrives; the script steps the
engine and records when the stream receives each token, until the long prompt has its
first token. With chunked prefill the long prompt is cut into `max_num_batched_tokens`
pieces and the stream gets a token every step; without it, the stream waits for the
whole prefill. A tiny random bf16 Qwen2 (demo shape, shrunk), so attention over the
long context is a visible part of each step, or any model (`--model`, e.g. the default
SmolLM2 GGUF); `--kv-cache-dtype int8` for the int8 cache. Prints the CPU and, per run,
the stream's inter-token latency p50 / p99 / max before and during the prefill.

    PYTHONPATH=$PWD python scripts/bench_long_prefill.py --prompt-tokens 16384
    PYTHONPATH=$PWD python scripts/bench_long_prefill.py --model default --prompt-tokens 4096 \
        --budgets 512 --no-unchunked --kv-cache-dtype int8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from yun.config import EngineConfig
from yun.demo import DemoShape, build_demo_checkpoint
from yun.engine.engine import LLMEngine
from yun.sampling_params import SamplingParams


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
    return (f"p50 {statistics.median(xs) * 1e3:7.1f} ms  p99 {p99 * 1e3:7.1f} ms  "
            f"max {xs[-1] * 1e3:7.1f} ms  (n={len(xs)})")


def run(path: str, prompt_tokens: int, batched: int | None, chunked: bool,
        kv_cache_dtype: str = "auto", demo: bool = True) -> None:
    cfg = EngineConfig(model=path, dtype="bfloat16" if demo else "auto",
                       max_model_len=prompt_tokens + 512,
                       kv_cache_memory=(prompt_tokens + 2048) * 4 * 2 * 2 * 64 * 2 if demo else None,
                       max_num_batched_tokens=batched, enable_chunked_prefill=chunked,
                       enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    eng = LLMEngine(cfg)
    eng.add_request("warm", list(range(1000, 2024)), SamplingParams(max_tokens=2))
    while eng.has_unfinished():  # first-use costs (kernel loads, allocator) out of the way
        eng.step()
    eng.add_request("stream", list(range(1000, 1032)), SamplingParams(
        temperature=0, max_tokens=min(4000, prompt_tokens), ignore_eos=True))
    times: list[float] = []

    def step() -> list:
        outs = eng.step()
        if any(o.request_id == "stream" for o in outs):
            times.append(time.perf_counter())
        return outs

    for _ in range(20):  # warm up; ITL before the long prompt
        step()
    before = [b - a for a, b in zip(times, times[1:])]
    times.clear()
    times.append(time.perf_counter())
    t0 = times[0]
    eng.add_request("long", [1000 + (i * 7919) % 3000 for i in range(prompt_tokens)],
                    SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    steps = 0
    while True:
        steps += 1
        if any(o.request_id == "long" for o in step()):
            break
    ttft = time.perf_counter() - t0
    during = [b - a for a, b in zip(times, times[1:])]
    name = f"chunked, {eng.max_num_batched_tokens} tokens/step" if chunked else "not chunked"
    name += f", kv {kv_cache_dtype}"
    print(f"{name:32s} long prompt {prompt_tokens} tokens: prefill {ttft:6.2f} s in {steps} steps")
    print(f"    stream ITL before: {_ms(before)}")
    print(f"    stream ITL during: {_ms(during)}")
    eng.abort("stream")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=16384)
    ap.add_argument("--budgets", default="512,2048", help="chunk sizes to try, comma-separated")
    ap.add_argument("--no-unchunked", action="store_true", help="skip the unchunked run")
    ap.add_argument("--model", default=None, help="a model to run instead of the tiny random "
                    "one ('default': SmolLM2-135M-Instruct, the default model)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"))
    args = ap.parse_args()
    from yun.kernels.cpu import cpu_model_name

    print(f"CPU: {cpu_model_name()}, {os.cpu_count()} logical CPUs")
    if args.model is not None:
        model = None if args.model == "default" else args.model
        for b in (int(x) for x in args.budgets.split(",")):
            run(model, args.prompt_tokens, b, True, args.kv_cache_dtype, demo=False)
        if not args.no_unchunked:
            run(model, args.prompt_tokens, None, False, args.kv_cache_dtype, demo=False)
        return
    shape = DemoShape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, vocab_size=4096,
                      max_position_embeddings=max(32768, args.prompt_tokens + 512))
    folder = os.path.join(tempfile.gettempdir(), f"yun-bench-long-{shape.max_position_embeddings}")
    path = build_demo_checkpoint(folder, shape)
    for b in (int(x) for x in args.budgets.split(",")):
        run(path, args.prompt_tokens, b, True, args.kv_cache_dtype)
    if not args.no_unchunked:
        run(path, args.prompt_tokens, None, False, args.kv_cache_dtype)


if __name__ == "__main__":
    main()
