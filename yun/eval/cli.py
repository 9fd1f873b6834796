"""`yun eval`: flags, and the glue between tasks, the evaluator and the report.

    yun eval --task mc_facts --endpoint q8=http://127.0.0.1:8000 --endpoint q4=http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

DEFAULT_OUTPUT_DIR = "eval-results"

DESCRIPTION = (
    "Ask OpenAI-compatible endpoints (yun, llama.cpp's llama-server, vLLM, a hosted API) "
    "the same task items and compare them with paired statistics: per endpoint the score "
    "with a 95% confidence interval (Wilson, or a bootstrap over items), per pair the "
    "paired difference with a bootstrap interval and McNemar's exact test (right/wrong "
    "items) or a permutation test, Holm-corrected when there are several comparisons, and "
    "a verdict in plain words. Answers are cached (endpoint + request), so a rerun asks "
    "only what is missing. Output: a table, JSON and a PNG in --output-dir. Exit status 1 "
    "when any item failed (the report says which), 2 on bad input.")

EPILOG = (
    "task kinds: loglik (multiple choice by log-likelihood: /v1/completions with echo and "
    "logprobs), letter (multiple choice by the letter a chat model answers), generate "
    "(exact, regex or numeric match), code (unit tests in a sandboxed subprocess), judge "
    "(a --judge model compares the answer with a reference; its prompt is in the JSON). "
    "Task files: our JSONL (see yun/eval/tasks.py) or an lm-evaluation-harness YAML over "
    "a local JSONL dataset.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from yun.eval.tasks import builtin_tasks

    g = p.add_argument_group("what to ask")
    g.add_argument("--task", action="append", required=True, metavar="TASK",
                   help="A task: a .jsonl file, an lm-eval .yaml file, or a built-in name ("
                        + ", ".join(builtin_tasks()) + "). Repeatable.")
    g.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL[,model=M,key=K]",
                   help="An OpenAI-compatible endpoint (URL with or without /v1; model: "
                        "default the first of /v1/models; key=env:VAR reads $VAR). Repeatable.")
    g.add_argument("--endpoints", default=None, metavar="FILE.yaml",
                   help="Endpoints from a YAML file: a list under 'endpoints' of {name, url, "
                        "model, key}.")
    g.add_argument("--judge", default=None, metavar="NAME=URL[,model=M,key=K]",
                   help="The endpoint that grades judge tasks (CORRECT / INCORRECT).")
    g.add_argument("--mc-scoring", choices=("loglik", "letter"), default=None,
                   help="Score multiple-choice tasks by log-likelihood or by the answered "
                        "letter (default: each task's own, loglik unless its file says).")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="Only the first N items of each task (default: all).")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="Most tokens per generated answer, overriding the tasks' own "
                        "(default: each task's, 256 unless its file says).")
    c = p.add_argument_group("requests")
    c.add_argument("--concurrency", type=int, default=4,
                   help="Requests in flight per endpoint (default: %(default)s).")
    c.add_argument("--timeout", type=float, default=120.0,
                   help="Seconds one request may take; then it counts as failed "
                        "(default: %(default)s).")
    c.add_argument("--retries", type=int, default=2,
                   help="Retries after HTTP 429/5xx or a connection error (not after a "
                        "time-out; default: %(default)s).")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="Where eval.json, eval.png and the answer cache go "
                        "(default: %(default)s/).")
    o.add_argument("--cache", default=None, metavar="PATH",
                   help="The answer cache, JSON lines (default: OUTPUT_DIR/cache.jsonl).")
    o.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="Ask every item again and store nothing.")
    o.add_argument("--no-plot", dest="plot", action="store_false", help="Write no PNG plot.")
    o.add_argument("--no-progress", dest="progress", action="store_false",
                   help="Hide the progress bar.")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `yun eval` on the top-level `yun` parser."""
    p = subparsers.add_parser("eval", help="Compare OpenAI-compatible endpoints on tasks, "
                                           "with paired statistics.",
                              description=DESCRIPTION, epilog=EPILOG)
    _add_arguments(p)
    p.set_defaults(func=cmd_eval)


def _endpoints(args: argparse.Namespace):
    from yun.eval.endpoints import check_unique, load_endpoints_file, parse_endpoint

    endpoints = load_endpoints_file(args.endpoints) if args.endpoints else []
    endpoints += [parse_endpoint(s) for s in args.endpoint]
    if not endpoints:
        raise ValueError("give at least one --endpoint NAME=URL (or --endpoints FILE.yaml)")
    judge = parse_endpoint(args.judge) if args.judge else None
    check_unique(endpoints + ([judge] if judge else []))
    return endpoints, judge


def _tasks(args: argparse.Namespace):
    from yun.eval.task_loader import load_task

    tasks = []
    for spec in args.task:
        t = load_task(spec).limited(args.limit)
        if args.mc_scoring and t.multiple_choice:
            t = replace(t, kind=args.mc_scoring)
        if args.max_tokens is not None:
            t = replace(t, options=replace(t.options, max_tokens=args.max_tokens))
        tasks.append(t)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return tasks


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--concurrency", args.concurrency), ("--limit", args.limit),
                        ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.timeout <= 0 or args.retries < 0:
        raise ValueError("--timeout must be positive and --retries not negative")


def cmd_eval(args: argparse.Namespace) -> int:
    from yun.eval import report
    from yun.eval.stats import _scipy_stats

    try:
        _scipy_stats()  # before asking any endpoint: the statistics need scipy
    except ImportError as e:  # scipy, from the eval extra
        raise RuntimeError(str(e)) from e
    from yun.eval.cache import AnswerCache
    from yun.eval.runner import RunOptions, evaluate

    _check_numbers(args)
    endpoints, judge = _endpoints(args)
    tasks = _tasks(args)
    if any(t.kind == "judge" for t in tasks) and judge is None:
        raise ValueError("a judge task needs --judge NAME=URL[,model=...]")
    cache_path = args.cache or os.path.join(args.output_dir, "cache.jsonl")
    cache = AnswerCache(cache_path if args.use_cache else None)
    options = RunOptions(args.concurrency, args.timeout, args.retries, args.progress)
    results, ev = evaluate(tasks, endpoints, cache, options, judge)
    summary = report.summarize(tasks, [e.name for e in endpoints], results)
    print(report.format_scores(summary))
    print()
    comparisons = report.format_comparisons(summary)
    if comparisons:
        print(comparisons)
        print()
    errors = report.format_errors(summary)
    if errors:
        print(errors, file=sys.stderr)
    info = {e.name: {"url": e.api_root, "model": ev.models.get(e.name),
                     "error": ev.model_errors.get(e.name)}
            for e in endpoints + ([judge] if judge else [])}
    requests = {"sent": ev.stats.requests_sent, "from_cache": ev.stats.cache_hits}
    # endpoint specs may hold API keys: the JSON names endpoints by URL and model only
    options_json = {k: v for k, v in vars(args).items()
                    if k not in ("func", "command", "endpoint", "judge")}
    payload = report.build_payload(options_json, tasks, info, summary, results, requests)
    out = os.path.join(args.output_dir, "eval")
    print(f"requests: {requests['sent']} sent, {requests['from_cache']} from the cache "
          f"({cache_path if args.use_cache else 'off'})")
    print(f"results: {report.write_json(out + '.json', payload)}")
    if args.plot:
        print(f"plot: {report.plot(summary, out + '.png', 'yun eval')}")
    return 1 if any(r.score is None for r in results) else 0
