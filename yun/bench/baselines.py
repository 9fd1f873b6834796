"""Peers run on the same checkpoint and workload in the same run (`--compare`).

Absolute numbers drift on shared machines; the ratios of one run are what we quote.

transformers (same dtype, same thread count, greedy, exact lengths):
- `single`: `model.generate` per request, min_new_tokens = max_new_tokens.
- `mixed`, `shared-prefix`: its best batched mode, the faster of
    static   left-padded batches of 16 through `generate`; each batch runs to its longest
             request (the extra tokens are that mode's waste and are not counted)
    continuous  transformers' continuous batching (`generate_batch`'s manager, fed each
             request's own max_new_tokens), where this transformers version has it
- `sweep`: static batches of the level's concurrency, each batch's requests sent as it
  starts (yun's sweep keeps that many in flight instead).
Token times come from a streamer, so TTFT/TPOT/E2E are measured like yun's (from the
phase start: every request is submitted at once).

llama.cpp: `llama-server -m GGUF -np 16 -c <ctx> -t <threads>` on a free loopback port,
measured with the same HTTP client as `yun bench serve`, then stopped.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from yun.bench.metrics import RequestRecord, RunResult, gaps
from yun.bench.workloads import BenchRequest, Workload

PEERS = ("transformers", "llama.cpp")
TRANSFORMERS_MODES = ("best", "static", "continuous")
CB_PAGE = 256  # tokens per block of transformers' paged cache (its default page_size)


# ---- transformers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformersOptions:
    dtype: str  # torch dtype name, as yun runs the model
    threads: int
    batch_size: int = 16
    mode: str = "best"
    max_batch_tokens: int = 2048  # continuous batching's token budget per step (yun's default)

    def __post_init__(self) -> None:
        if self.mode not in TRANSFORMERS_MODES:
            raise ValueError(f"mode must be one of {TRANSFORMERS_MODES}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


class _TokenClock:
    """A generate() streamer that notes when each step's new tokens appear."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def _load_hf(path: str, opts: TransformersOptions):
    import torch
    import transformers

    from yun.config import ModelConfig

    torch.set_num_threads(opts.threads)
    arch = ModelConfig.load(path).architecture
    cls, dtype = getattr(transformers, arch), getattr(torch, opts.dtype)
    if os.path.isfile(path):  # a GGUF file: transformers dequantizes it
        model = cls.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                    gguf_file=os.path.basename(path), dtype=dtype)
    else:
        model = cls.from_pretrained(path, dtype=dtype)
    return model.eval()


def _eos_and_pad(model) -> tuple[list[int], int]:
    eos = model.generation_config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad if isinstance(pad, int) else pad[0])


def static_batches(model, requests: list[BenchRequest], batch_size: int, system: str,
                   workload: str, progress: bool = False, closed_loop: bool = False
                   ) -> RunResult:
    """`generate` on left-padded batches, in order. Every request is submitted at the
    start, or with `closed_loop` (a sweep level), when its batch starts."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    eos_ids, pad = _eos_and_pad(model)
    records = [RequestRecord(prompt_tokens=r.num_prompt_tokens) for r in requests]
    bar = tqdm(total=len(requests), desc=f"{system} {workload}", unit="req", disable=not progress)
    t0 = time.monotonic()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        sent = time.monotonic() if closed_loop else t0
        width = max(r.num_prompt_tokens for r in batch)
        longest = max(r.max_tokens for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, width], left-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, width]
        for row, r in enumerate(batch):
            ids[row, width - r.num_prompt_tokens:] = torch.tensor(r.prompt_token_ids)
            mask[row, width - r.num_prompt_tokens:] = 1
        config = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest,
                                  do_sample=False, repetition_penalty=1.0,
                                  eos_token_id=eos_ids or None, pad_token_id=pad)
        clock = _TokenClock()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           streamer=clock)
        for row, r in enumerate(batch):
            rec, times = records[start + row], clock.times[:r.max_tokens]
            rec.start = sent - t0
            rec.output_tokens = len(times)
            rec.ttft = times[0] - sent
            rec.e2e = times[-1] - sent
            rec.itls = gaps(times)
        bar.update(len(batch))
    bar.close()
    return RunResult(system=system, workload=workload, duration=time.monotonic() - t0,
                     records=records)


def continuous_batching(model, requests: list[BenchRequest], max_batch_tokens: int,
                        system: str, workload: str, progress: bool = False) -> RunResult:
    """transformers' continuous batching manager, each request with its own length."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    _, pad = _eos_and_pad(model)
    longest = max(r.max_tokens for r in requests)
    config = GenerationConfig(do_sample=False, max_new_tokens=longest, eos_token_id=-1,
                              pad_token_id=pad, repetition_penalty=1.0)
    # An explicit cache size: without one, on CPU it sizes itself to most of the RAM.
    blocks = sum(math.ceil((r.num_prompt_tokens + r.max_tokens) / CB_PAGE) for r in requests)
    cb = ContinuousBatchingConfig(num_blocks=blocks + len(requests) + 1,
                                  max_batch_tokens=max_batch_tokens)
    records = [RequestRecord(prompt_tokens=r.num_prompt_tokens) for r in requests]
    with model.continuous_batching_context_manager(
            generation_config=config, block=True, timeout=5, continuous_batching_config=cb,
            warmup=False) as manager:
        _collect(manager, [("warmup", [11, 12, 13, 14, 15, 16, 17, 18], 2)])  # untimed
        bar = tqdm(total=len(requests), desc=f"{system} {workload}", unit="req",
                   disable=not progress)
        t0 = time.perf_counter()
        jobs = [(f"bench-{i}", r.prompt_token_ids, r.max_tokens) for i, r in enumerate(requests)]
        results = _collect(manager, jobs, bar.update)
        duration = time.perf_counter() - t0
        bar.close()
    for i, rec in enumerate(records):
        out = results.get(f"bench-{i}")
        if out is None or out.error is not None:
            rec.error = "no result" if out is None else str(out.error)
            continue
        times = list(out.timestamps or [])
        rec.output_tokens = len(out.generated_tokens)
        end = times[-1] if times else out.lifespan[1]
        rec.ttft = (times[0] if times else end) - t0
        rec.e2e = end - t0
        rec.itls = gaps(times)
    return RunResult(system=system, workload=workload, duration=duration, records=records)


def _collect(manager, jobs: list[tuple[str, list[int], int]], tick=None) -> dict[str, Any]:
    for rid, ids, n in jobs:
        manager.add_request(list(ids), request_id=rid, max_new_tokens=n, record_timestamps=True,
                            eos_token_id=-1)
    results: dict[str, Any] = {}
    while len(results) < len(jobs):
        out = manager.get_result(timeout=1)
        if out is not None and out.is_finished():
            results[out.request_id] = out
            if tick:
                tick(1)
        elif out is None and not manager.is_running():
            break
    return results


def run_transformers(path: str, workload: Workload, opts: TransformersOptions,
                     progress: bool = True) -> list[RunResult]:
    """transformers on every phase of `workload` (see the module docstring)."""
    model = _load_hf(path, opts)
    static_batches(model, [BenchRequest([11, 12, 13, 14], 2)], 1, "warmup", "")
    if workload.name == "single":
        return [_tag(static_batches(model, rs, 1, "transformers (generate)", workload.name,
                                    progress), mode="generate, batch 1")
                for _, rs in workload.phases()]
    if workload.is_sweep:
        out = []
        for c, rs in workload.phases():
            res = static_batches(model, rs, c or opts.batch_size,
                                 "transformers (generate, static batches of the concurrency)",
                                 workload.name, progress, closed_loop=True)
            res.concurrency = c
            out.append(_tag(res, mode=f"static batches of {c}"))
        return out
    return [_best_batched(model, rs, opts, workload.name, progress)
            for _, rs in workload.phases()]


def _best_batched(model, requests: list[BenchRequest], opts: TransformersOptions,
                  workload: str, progress: bool) -> RunResult:
    runs: list[RunResult] = []
    if opts.mode in ("best", "static"):
        runs.append(_tag(static_batches(
            model, requests, opts.batch_size,
            f"transformers (generate, static batches of {opts.batch_size})", workload,
            progress), mode=f"static batches of {opts.batch_size}"))
    if opts.mode in ("best", "continuous"):
        if hasattr(model, "generate_batch"):
            runs.append(_tag(continuous_batching(
                model, requests, opts.max_batch_tokens,
                "transformers (continuous batching)", workload, progress),
                mode="continuous batching"))
        elif opts.mode == "continuous":
            raise RuntimeError("this transformers version has no continuous batching "
                               "(generate_batch); use --transformers-mode static")
    best = max(runs, key=lambda r: (r.num_errors == 0, r.output_tokens_per_s))
    best.extra["modes_tried_tokens_per_s"] = {r.extra["mode"]: r.output_tokens_per_s
                                              for r in runs}
    return best


def _tag(result: RunResult, **extra: Any) -> RunResult:
    result.extra.update(extra)
    return result


# ---- llama.cpp ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaCppOptions:
    binary: str  # path to llama-server
    gguf: str
    threads: int = 2
    parallel: int = 16  # -np: slots decoding at once
    ctx: int | None = None  # -c: total context; default parallel x the longest request
    startup_timeout: float = 600.0
    log_path: str | None = None  # where the server's output goes (default: discarded)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_command(opts: LlamaCppOptions, port: int, workload: Workload) -> list[str]:
    per_slot = math.ceil((workload.max_seq_len() + 16) / 256) * 256
    ctx = opts.ctx or opts.parallel * per_slot
    return [opts.binary, "-m", opts.gguf, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(opts.parallel), "-c", str(ctx), "-t", str(opts.threads)]


def wait_until_ready(base_url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll /health until 200 (llama-server answers 503 while it loads the model)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama-server did not become ready within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_llama_cpp(opts: LlamaCppOptions, workload: Workload, temperature: float = 0.0,
                  seed: int = 0, progress: bool = True) -> list[RunResult]:
    """Start llama-server, run `workload` through the HTTP client, stop it."""
    from yun.bench.online import ClientOptions, run_workload

    for path, what in ((opts.binary, "llama-server binary"), (opts.gguf, "GGUF file")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such {what}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = llama_server_command(opts, port, workload)
    log = open(opts.log_path, "w", encoding="utf-8") if opts.log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(base, proc, opts.startup_timeout)
            client = ClientOptions(base_url=base, backend="llama.cpp", temperature=temperature,
                                   seed=seed, progress=progress)
            results = run_workload(client, workload, system="llama.cpp")
        finally:
            stop_process(proc)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()
    for r in results:
        r.extra["command"] = " ".join(cmd)
    return results
