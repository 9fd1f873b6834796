"""`yun bench` is registered on the `yun` parser and every flag explains itself."""

from __future__ import annotations

import argparse

import pytest

from yun.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_bench_flag_has_help():
    bench = _subparsers(build_parser())["bench"]
    commands = _subparsers(bench)
    assert set(commands) == {"throughput", "serve", "roofline", "plot"}
    for name, p in commands.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.option_strings}"
        assert p.format_help()  # renders (no bad %-formats in help strings)


def test_flags_parse_into_the_expected_values():
    p = build_parser()
    args = p.parse_args(["bench", "throughput", "--workload", "sweep", "--concurrency-levels",
                         "1,4", "--compare", "transformers,llama.cpp", "--max-num-seqs", "8"])
    assert args.concurrency_levels == (1, 4) and args.compare == ["transformers", "llama.cpp"]
    assert args.max_num_seqs == 8 and args.roofline is True
    args = p.parse_args(["bench", "serve", "--base-url", "http://x", "--request-rate", "2"])
    assert args.request_rate == 2.0 and args.concurrency is None and args.backend == "openai"
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "throughput", "--compare", "vllm"])
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "throughput", "--concurrency-levels", "0,2"])
