"""`yun bench throughput | serve | roofline`: flags and the glue between the modules.

    yun bench throughput --workload mixed --compare transformers     # offline, yun.LLM
    yun bench serve --base-url http://127.0.0.1:8000 --workload mixed --request-rate 4
    yun bench roofline                                               # the machine's ceilings
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from dataclasses import asdict
from typing import Any

from yun.bench.metrics import RunResult
from yun.bench.workloads import DEFAULT_SWEEP, ORDINARY_VOCAB, WORKLOADS, Workload, \
    WorkloadOptions, make_workload

DEFAULT_OUTPUT_DIR = "bench-results"
WORKLOAD_HELP = ("single: 1 request, prompt 128, 256 new tokens. mixed: 64 requests, "
                 "prompts uniform 32-512, outputs uniform 32-256. shared-prefix: 64 requests "
                 "sharing a 1,024-token system prompt + a 64-token question, 64 new tokens. "
                 "sweep: mixed-like requests at concurrency 1, 2, 4, ..., 64. edit: 1 chat "
                 "request asking for a ~300-token document back with one word replaced, 256 "
                 "new tokens (real text; the case for n-gram speculation).")


# ---- shared flags --------------------------------------------------------------------------
def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive: {text}")
    return levels


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="mixed",
                   help=WORKLOAD_HELP + " (default: %(default)s)")
    g.add_argument("--num-requests", type=int, default=None,
                   help="Requests in the workload (per concurrency level for sweep). "
                        "Default: the workload's own (1, 64, 64, max(4, 2 x level)).")
    g.add_argument("--scale", type=float, default=1.0,
                   help="Multiply every prompt and output length (e.g. 0.1 for a smoke run; "
                        "default: %(default)s).")
    g.add_argument("--workload-seed", type=int, default=0,
                   help="Seed of the prompts and lengths: the same seed, the same workload "
                        "(default: %(default)s).")
    g.add_argument("--num-prefixes", type=int, default=1,
                   help="shared-prefix: distinct system prompts, assigned round-robin "
                        "(default: %(default)s).")
    g.add_argument("--concurrency-levels", type=_levels,
                   default=DEFAULT_SWEEP, metavar="N,N,...",
                   help="sweep: concurrency levels (default: "
                        f"{','.join(map(str, DEFAULT_SWEEP))}).")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="Sampling temperature; 0 = greedy (default: %(default)s). Outputs "
                        "always have exactly the requested length (ignore_eos).")
    s.add_argument("--sampling-seed", type=int, default=0,
                   help="With temperature > 0, request i samples with seed SAMPLING_SEED + i "
                        "(default: %(default)s).")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="Where the results JSON and the PNG plot go (default: %(default)s/).")
    g.add_argument("--no-plot", dest="plot", action="store_false",
                   help="Write no PNG plot.")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="Hide the progress bars.")


def _add_roofline_flags(p: argparse.ArgumentParser, enabled_by_default: bool,
                        group: Any = None) -> None:
    g = group or p.add_argument_group("roofline")
    if enabled_by_default:
        g.add_argument("--no-roofline", dest="roofline", action="store_false",
                       help="Skip measuring the machine's ceilings (bandwidth, FLOP/s).")
    g.add_argument("--probe-mib", type=int, default=None,
                   help="Buffer size of the bandwidth probes in MiB (default: the model's "
                        "weight bytes, clamped to 16-1024).")
    g.add_argument("--probe-repeats", type=int, default=5,
                   help="Timed repeats of each probe; the best counts (default: %(default)s).")


def _workload(args: argparse.Namespace, vocab_size: int, tokenizer=None) -> Workload:
    return make_workload(args.workload, WorkloadOptions(
        num_requests=args.num_requests, scale=args.scale, seed=args.workload_seed,
        num_prefixes=args.num_prefixes, concurrency_levels=args.concurrency_levels,
        vocab_size=vocab_size), tokenizer)


def _roofline(path: str, args: argparse.Namespace, dtype: str, threads: int | None,
              native: bool):
    from yun.bench.report import format_roofline
    from yun.bench.roofline import MIB, measure_roofline

    probe = args.probe_mib * MIB if args.probe_mib else None
    roof = measure_roofline(path, dtype=dtype, threads=threads, probe_bytes=probe,
                            native_kernels=native, repeats=args.probe_repeats)
    print(format_roofline(roof.to_json()), flush=True)
    return roof


# ---- yun bench throughput ------------------------------------------------------------------
def cmd_throughput(args: argparse.Namespace) -> int:
    from yun.cli_flags import engine_config_from
    from yun.config import ModelConfig
    from yun.model_source import DEMO_RANDOM, resolve_model

    _check_peers(args)
    if args.model is None:  # benchmarks default to the 0.5B-shaped random checkpoint
        args.model = DEMO_RANDOM
    path = resolve_model(args.model)
    tokenizer = None
    if args.workload == "edit":  # real text, in the model's chat template
        from yun.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
    workload = _workload(args, ModelConfig.load(path).vocab_size, tokenizer)
    config = engine_config_from(args)
    widest = max(c or 0 for c, _ in workload.phases())
    if widest > config.max_num_seqs:
        print(f"yun bench: raising --max-num-seqs to {widest} for the sweep", file=sys.stderr)
        config = engine_config_from(args, max_num_seqs=widest)
    print(f"workload {workload.name}: {workload.description}", flush=True)
    roof = _roofline(path, args, config.dtype, config.num_threads,
                     config.native_kernels) if args.roofline else None
    results = _run_yun_offline(config, workload, args)
    results += _run_peers(path, workload, args, config, roof)
    return _finish("throughput", args, workload, results, roof)


def _run_yun_offline(config, workload: Workload, args: argparse.Namespace) -> list[RunResult]:
    from yun.bench.offline import SamplingOptions, run_yun
    from yun.llm import LLM

    from dataclasses import replace

    configs = [config]
    if getattr(args, "speculation_off_too", False) and config.speculative_method:
        configs.insert(0, replace(config, speculative_method=None, speculative_model=None))
    results: list[RunResult] = []
    for cfg in configs:
        llm = LLM(**asdict(cfg))
        try:
            results += run_yun(llm, workload, SamplingOptions(args.temperature,
                                                              args.sampling_seed),
                               progress=args.progress)
        finally:
            del llm
            gc.collect()
    return results


def _run_peers(path: str, workload: Workload, args: argparse.Namespace, config,
               roof) -> list[RunResult]:
    from yun.bench import baselines

    out: list[RunResult] = []
    threads = config.num_threads or _default_threads()
    for peer in args.compare:
        if peer == "transformers":
            dtype = roof.cost.dtype if roof else _run_dtype(path, config.dtype)
            opts = baselines.TransformersOptions(
                dtype=dtype, threads=threads, batch_size=args.transformers_batch_size,
                mode=args.transformers_mode, max_batch_tokens=config.max_num_batched_tokens or 512)
            out += baselines.run_transformers(path, workload, opts, progress=args.progress)
        elif peer == "llama.cpp":
            opts = baselines.LlamaCppOptions(
                binary=args.llama_server, gguf=args.gguf,
                threads=args.llama_threads or threads,
                parallel=args.llama_parallel or (1 if workload.name == "single" else 16),
                log_path=args.llama_log)
            out += baselines.run_llama_cpp(opts, workload, args.temperature,
                                           args.sampling_seed, progress=args.progress)
        gc.collect()
    return out


def _check_peers(args: argparse.Namespace) -> None:
    """Refuse a peer that cannot run before spending time on yun's run."""
    if "llama.cpp" not in args.compare:
        return
    if args.gguf is None and args.model and args.model.endswith(".gguf"):
        args.gguf = args.model  # yun and llama.cpp on the same file
    if not (args.llama_server and args.gguf):
        raise ValueError("--compare llama.cpp needs --llama-server PATH and --gguf PATH")
    for path, what in ((args.llama_server, "llama-server binary"), (args.gguf, "GGUF file")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such {what}")


def _default_threads() -> int:
    from yun.engine.device import default_threads

    return default_threads()


def _run_dtype(path: str, dtype: str) -> str:
    from yun.bench.roofline import model_cost

    return model_cost(path, dtype).dtype


def _peers(text: str) -> list[str]:
    from yun.bench.baselines import PEERS

    peers = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {bad}; choose from {PEERS}")
    return peers


# ---- yun bench serve -----------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from yun.bench.online import ClientOptions, run_workload

    vocab = args.vocab_size
    if vocab is None and args.roofline_model:
        from yun.config import ModelConfig

        vocab = ModelConfig.load(args.roofline_model).vocab_size
    workload = _workload(args, vocab or ORDINARY_VOCAB)
    print(f"workload {workload.name}: {workload.description}", flush=True)
    roof = None
    if args.roofline_model:
        roof = _roofline(args.roofline_model, args, args.roofline_dtype, args.roofline_threads,
                         native=True)
    options = ClientOptions(
        base_url=args.base_url, model=args.model, backend=args.backend,
        request_rate=args.request_rate, concurrency=args.concurrency,
        temperature=args.temperature, seed=args.sampling_seed, timeout=args.timeout,
        api_key=args.api_key, tokenizer=args.tokenizer, warmup=args.warmup,
        progress=args.progress)
    results = run_workload(options, workload, system=args.label)
    return _finish("serve", args, workload, results, roof)


# ---- results -------------------------------------------------------------------------------
def _finish(command: str, args: argparse.Namespace, workload: Workload,
            results: list[RunResult], roof) -> int:
    from yun.bench import report
    from yun.bench.metrics import decode_tokens_per_s
    from yun.bench.roofline import attach_ceiling

    phases = {c: rs for c, rs in workload.phases()}
    for r in results:
        if workload.name == "single":
            r.extra.setdefault("decode_tokens_per_s", decode_tokens_per_s(r))
        if roof is not None:  # a narrower concurrency means more steps: a lower ceiling
            phase = phases[r.concurrency if workload.is_sweep else None]
            attach_ceiling(r, roof, phase, r.concurrency)
    print()
    print(report.format_table(results))
    rows = report.ratios(results)
    if rows:
        print(report.format_ratios(rows))
    for w in report.ceiling_warnings(results):
        print(w, file=sys.stderr)
    stem = report.output_stem(args.output_dir, command, workload.name)
    payload = report.build_payload(command, sys.argv[1:], workload.summary(),
                                   _options(args), results,
                                   roof.to_json() if roof is not None else None)
    print(f"results: {report.write_json(stem + '.json', payload)}")
    if args.plot:
        title = f"yun bench {command}: {workload.name}"
        print(f"plot: {report.plot(results, stem + '.png', title, workload.is_sweep)}")
    errors = sum(r.num_errors for r in results)
    if errors:
        print(f"yun bench: {errors} request(s) failed (see the JSON for messages)",
              file=sys.stderr)
    return 1 if errors else 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "command", "bench_command"}
    return {k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in vars(args).items() if k not in skip}


# ---- yun bench roofline --------------------------------------------------------------------
def cmd_roofline(args: argparse.Namespace) -> int:
    from yun.model_source import DEMO_RANDOM, resolve_model

    _roofline(resolve_model(args.model or DEMO_RANDOM), args, args.dtype, args.num_threads, native=True)
    return 0


# ---- parser --------------------------------------------------------------------------------
def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `yun bench ...` on the top-level `yun` parser."""
    bench = subparsers.add_parser(
        "bench", help="Benchmarks: offline throughput, an HTTP load generator, ceilings.",
        description="Benchmark yun (and peers) on seeded standard workloads. Results go to "
                    "stdout as a table, and to --output-dir as JSON and a PNG plot.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    _add_throughput_parser(sub)
    _add_serve_parser(sub)
    _add_roofline_parser(sub)
    _add_plot_parser(sub)


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="Draw the PNG of a results JSON again (e.g. after a style change).",
        description="Read a results file written by `yun bench throughput` or `yun bench "
                    "serve` and draw its plot next to it (same name, .png) or to --output.")
    p.add_argument("results", metavar="RESULTS.json", help="A results file of yun bench.")
    p.add_argument("--output", default=None, metavar="PNG",
                   help="Where to write the plot (default: beside the JSON, .png).")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    import json

    from yun.bench import report

    with open(args.results, encoding="utf-8") as f:
        payload = json.load(f)
    results = [RunResult.from_json(r) for r in payload["runs"]]
    workload = payload["workload"]
    sweep = bool(workload.get("levels"))
    out = args.output or os.path.splitext(args.results)[0] + ".png"
    title = f"yun bench {payload['command']}: {workload['name']}"
    print(f"plot: {report.plot(results, out, title, sweep)}")
    return 0


def _add_throughput_parser(sub: argparse._SubParsersAction) -> None:
    from yun.cli_flags import add_dataclass_flags
    from yun.config import EngineConfig

    p = sub.add_parser(
        "throughput", help="Offline: a workload through yun.LLM, with optional peers.",
        description="Run a workload through yun's offline engine (all requests submitted at "
                    "once; sweep: closed-loop at each concurrency), measure the machine's "
                    "ceilings first, and report output tokens/s, requests/s, TTFT/TPOT/E2E "
                    "percentiles and each result as a fraction of its ceiling. --compare runs "
                    "peers on the same checkpoint and workload, one after the other.")
    _add_workload_flags(p)
    g = p.add_argument_group("peers")
    g.add_argument("--compare", type=_peers, default=[], metavar="PEER[,PEER]",
                   help="Also run these on the same checkpoint and workload and print yun's "
                        "ratios: transformers, llama.cpp.")
    g.add_argument("--transformers-mode", choices=("best", "static", "continuous"),
                   default="best",
                   help="transformers' batched mode for mixed/shared-prefix: static "
                        "(left-padded batches via generate), continuous (generate_batch's "
                        "continuous batching) or best (both, keep the faster; default).")
    g.add_argument("--transformers-batch-size", type=int, default=16,
                   help="Static batch size for transformers (default: %(default)s).")
    g.add_argument("--llama-server", default=None, metavar="PATH",
                   help="llama.cpp's llama-server binary, for --compare llama.cpp.")
    g.add_argument("--gguf", default=None, metavar="PATH",
                   help="The same checkpoint as a GGUF file, for --compare llama.cpp "
                        "(default: --model, when that is a GGUF file).")
    g.add_argument("--llama-parallel", type=int, default=None,
                   help="llama-server -np: slots decoding at once (default: 1 for the single "
                        "workload, where more slots only slow it down, else 16).")
    g.add_argument("--llama-threads", type=int, default=None,
                   help="llama-server -t (default: yun's thread count).")
    g.add_argument("--llama-log", default=None, metavar="PATH",
                   help="Write llama-server's output here (default: discarded).")
    g.add_argument("--speculation-off-too", action="store_true",
                   help="With --speculative-method: run yun with speculation off first, on "
                        "the same workload, so the report has both (speed and an output "
                        "fingerprint: equal fingerprints, identical tokens).")
    _add_roofline_flags(p, enabled_by_default=True)
    _add_output_flags(p)
    add_dataclass_flags(p.add_argument_group("engine"), EngineConfig)
    p.set_defaults(func=cmd_throughput)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from yun.bench.online import BACKENDS

    p = sub.add_parser(
        "serve", help="Online: load an OpenAI-compatible server (yun, vLLM, llama.cpp, ...).",
        description="Send a workload to a running OpenAI-compatible server as streaming "
                    "/v1/completions requests (token-id prompts, exact lengths), at a "
                    "Poisson request rate or a fixed concurrency, and report TTFT, TPOT, "
                    "inter-token latency, E2E, output tokens/s, requests/s and errors.")
    g = p.add_argument_group("server")
    g.add_argument("--base-url", required=True,
                   help="The server's address, e.g. http://127.0.0.1:8000 (with or without /v1).")
    g.add_argument("--model", default=None,
                   help="Model name to send. Default: the first id from /v1/models.")
    g.add_argument("--backend", choices=BACKENDS, default="openai",
                   help="openai, yun, vllm, llama.cpp: token-id prompts with ignore_eos and "
                        "stream_options.include_usage. transformers (transformers serve): "
                        "text prompts decoded with --tokenizer, no extras (default: "
                        "%(default)s).")
    g.add_argument("--api-key", default=None, help="Sent as `Authorization: Bearer KEY`.")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="Folder with the model's tokenizer (text backends only).")
    g.add_argument("--label", default=None,
                   help="Name of the system in the report (default: BACKEND MODEL).")
    g.add_argument("--timeout", type=float, default=3600.0,
                   help="Seconds one request may take (default: %(default)s).")
    g.add_argument("--warmup", type=int, default=1,
                   help="Untimed short requests sent first (default: %(default)s).")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Draw prompt ids below this (default: the --roofline-model's "
                        f"vocabulary, else {ORDINARY_VOCAB}, Qwen2's ordinary tokens).")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Requests per second, Poisson arrivals seeded by --sampling-seed "
                           "(default: inf, all at once).")
    load.add_argument("--concurrency", type=int, default=None,
                      help="Most requests in flight (default: no limit). Sweep sets it per "
                           "level.")
    _add_workload_flags(p)
    r = p.add_argument_group("roofline")
    r.add_argument("--roofline-model", default=None, metavar="PATH",
                   help="A local checkpoint folder of the served model: measure this "
                        "machine's ceilings and report fractions (meaningful only when the "
                        "server runs on this machine).")
    r.add_argument("--roofline-dtype", default="auto",
                   help="The dtype the server runs the weights in (default: the checkpoint's).")
    r.add_argument("--roofline-threads", type=int, default=None,
                   help="Threads of the probes (default: one per core).")
    _add_roofline_flags(p, enabled_by_default=False, group=r)
    _add_output_flags(p)
    p.set_defaults(func=cmd_serve)


def _add_roofline_parser(sub: argparse._SubParsersAction) -> None:
    from yun.cli_flags import add_dataclass_flags
    from yun.config import EngineConfig

    p = sub.add_parser(
        "roofline", help="Measure the machine's bandwidth and FLOP/s and a model's ceilings.",
        description="Probe memory read bandwidth and matmul FLOP/s, count the model's "
                    "bytes and FLOPs per token, and print the batch-1 decode ceiling.")
    _add_roofline_flags(p, enabled_by_default=False)
    add_dataclass_flags(p.add_argument_group("engine"), EngineConfig,
                        skip={f for f in EngineConfig.field_names()
                              if f not in ("model", "dtype", "num_threads")})
    p.set_defaults(func=cmd_roofline)
