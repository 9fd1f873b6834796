"""The evaluator and the CLI against scripted endpoints: failures (HTTP 500, time-outs,
connection refused) are reported per item and never stop a run; a rerun asks only what is
missing or failed; the report's numbers agree with the per-item results."""

from __future__ import annotations

import json
import socket

import pytest

from tests.bench.conftest import live_server
from tests.eval.fake_endpoint import build_app, last_user
from yun.cli import main
from yun.eval import report
from yun.eval.cache import AnswerCache
from yun.eval.endpoints import Endpoint
from yun.eval.runner import RunOptions, evaluate
from yun.eval.task_loader import load_task

ARITH = load_task("arith")
ANSWERS = {it.prompt: it.answer for it in ARITH.items}
QUIET = RunOptions(concurrency=4, timeout_s=10, retries=0, progress=False)


def right(body) -> str:
    return f"The answer is {ANSWERS[last_user(body)]}."


def right_on_even(body) -> str:
    q = last_user(body)
    index = list(ANSWERS).index(q)
    return right(body) if index % 2 == 0 else "I think 999."


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_endpoints_are_reported_per_item_not_crashed_on(tmp_path):
    task = ARITH.limited(6)
    odd = lambda body: list(ANSWERS).index(last_user(body)) % 2 == 1  # noqa: E731
    with live_server(build_app(right)) as good, \
            live_server(build_app(right, fail=odd)) as flaky, \
            live_server(build_app(right, delay_s=3.0)) as slow:
        endpoints = [Endpoint("good", good), Endpoint("flaky", flaky),
                     Endpoint("slow", slow, model="fake"),
                     Endpoint("down", f"http://127.0.0.1:{closed_port()}")]
        options = RunOptions(concurrency=6, timeout_s=0.5, retries=1, progress=False)
        results, ev = evaluate([task], endpoints, AnswerCache(None), options)
    by = {(r.endpoint, r.item): r for r in results}
    ids = [it.id for it in task.items]
    assert all(by[("good", i)].score == 1.0 for i in ids)
    assert [by[("flaky", i)].score for i in ids] == [1.0, None] * 3
    assert all("HTTP 500" in by[("flaky", i)].error for i in ids[1::2])
    assert all("timed out" in by[("slow", i)].error for i in ids)
    assert all("cannot list models" in by[("down", i)].error for i in ids)
    summary = report.summarize([task], [e.name for e in endpoints], results)
    rows = {r.endpoint: r for r in summary.rows}
    assert (rows["flaky"].errors, rows["flaky"].score.n, rows["flaky"].score.mean) == (3, 3, 1.0)
    assert (rows["down"].errors, rows["down"].score.n) == (6, 0)
    text = report.format_scores(summary) + report.format_errors(summary)
    assert "down on arith: 6 item(s) failed" in text
    pair = next(c for c in summary.comparisons if (c.a, c.b) == ("good", "flaky"))
    assert pair.n == 3 and pair.diff == 0.0  # only the items both answered


def test_requests_in_flight_stay_within_the_bound_per_endpoint():
    a, b = {}, {}
    with live_server(build_app(right, delay_s=0.2, in_flight=a)) as ua, \
            live_server(build_app(right, delay_s=0.2, in_flight=b)) as ub:
        results, ev = evaluate([ARITH.limited(8)], [Endpoint("a", ua), Endpoint("b", ub)],
                               AnswerCache(None), RunOptions(concurrency=2, retries=0,
                                                             progress=False))
    assert ev.stats.requests_sent == 16 and all(r.score == 1.0 for r in results)
    assert a["most"] == b["most"] == 2


def test_letter_scoring_asks_a_chat_model_with_lettered_choices():
    from dataclasses import replace

    task = replace(load_task("mc_facts").limited(4), kind="letter")
    log: list = []

    def letter(body) -> str:  # right on the first two items, "A" after
        q = last_user(body)
        item = next(it for it in task.items if q.startswith(it.prompt))
        return "ABCD"[item.answer] + "." if item in task.items[:2] else "A"

    with live_server(build_app(letter, log=log)) as url:
        results, _ = evaluate([task], [Endpoint("a", url)], AnswerCache(None), QUIET)
    assert any("\nA. Berlin\nB. Madrid\nC. Paris\nD. Rome\n" in last_user(b) for b in log)
    expected = [1.0, 1.0] + [float(it.answer == 0) for it in task.items[2:]]
    assert [r.score for r in results] == expected


def test_a_rerun_asks_only_the_missing_and_the_failed_items(tmp_path):
    task = ARITH.limited(8)
    cache = str(tmp_path / "cache.jsonl")
    log: list = []
    fail_first = lambda body: "apples" in last_user(body)  # noqa: E731 - no such item in 8
    with live_server(build_app(right, fail=fail_first, log=log)) as url:
        ep = [Endpoint("a", url)]
        first, ev1 = evaluate([ARITH.limited(5)], ep, AnswerCache(cache), QUIET)
        assert ev1.stats.requests_sent == len(log) == 5
        second, ev2 = evaluate([task], ep, AnswerCache(cache), QUIET)
        assert (ev2.stats.requests_sent, ev2.stats.cache_hits) == (3, 5)
        assert len(log) == 8
        asked = [last_user(b) for b in log[5:]]
        assert asked == [it.prompt for it in task.items[5:]]
        assert [r.cached for r in second] == [True] * 5 + [False] * 3
        assert [r.score for r in second] == [1.0] * 8
        third, ev3 = evaluate([task], ep, AnswerCache(cache), QUIET)
        assert ev3.stats.requests_sent == 0 and len(log) == 8
        assert [r.score for r in third] == [r.score for r in second]


def test_failed_answers_are_not_cached_and_are_asked_again(tmp_path):
    cache = str(tmp_path / "cache.jsonl")
    task = ARITH.limited(4)
    broken = {"on": True}
    log: list = []
    app = build_app(right, fail=lambda body: broken["on"] and "3" in last_user(body), log=log)
    with live_server(app) as url:
        ep = [Endpoint("a", url)]
        first, _ = evaluate([task], ep, AnswerCache(cache), QUIET)
        failed = [r.item for r in first if r.score is None]
        assert failed  # "What is 2 + 3?" and "What is 3 times 4?"
        broken["on"] = False
        second, ev = evaluate([task], ep, AnswerCache(cache), QUIET)
    assert ev.stats.requests_sent == len(failed)
    assert all(r.score == 1.0 for r in second)


def test_cli_writes_table_json_and_png_and_exits_1_when_items_failed(tmp_path, capsys):
    out = tmp_path / "out"
    with live_server(build_app(right)) as good, live_server(build_app(right_on_even)) as half:
        argv = ["eval", "--task", "arith", "--limit", "12", "--endpoint", f"good={good}",
                "--endpoint", f"half={half}/v1,model=fake,key=sk-secret-123",
                "--endpoint", f"down=http://127.0.0.1:{closed_port()}",
                "--output-dir", str(out), "--no-progress", "--retries", "0"]
        assert main(argv) == 1
    printed = capsys.readouterr()
    assert "good beats half on arith: +50.0 points, 95% CI [" in printed.out
    assert "good vs down on arith: not compared (no item answered by both)" in printed.out
    assert "down on arith: 12 item(s) failed" in printed.err
    raw = (out / "eval.json").read_text()
    assert "sk-secret-123" not in raw
    payload = json.loads(raw)
    assert (out / "eval.png").stat().st_size > 1000
    scores = {s["endpoint"]: s for s in payload["scores"]}
    assert scores["good"]["mean"] == 1.0 and scores["half"]["mean"] == 0.5
    comp = next(c for c in payload["comparisons"] if (c["a"], c["b"]) == ("good", "half"))
    items = [i for i in payload["items"] if i["endpoint"] == "half"]
    assert comp["b_only"] == 0 and comp["a_only"] == sum(i["score"] == 0 for i in items) == 6
    assert comp["diff"] == pytest.approx(scores["good"]["mean"] - scores["half"]["mean"])
    assert comp["low"] <= comp["diff"] <= comp["high"]
    assert comp["p_value"] == pytest.approx(2 / 2**6)  # McNemar 6 vs 0
    assert comp["p_adjusted"] is None  # the one comparison with items: nothing to correct


def test_cli_rejects_bad_endpoints_and_tasks_with_a_message(tmp_path, capsys):
    assert main(["eval", "--task", "arith", "--endpoint", "nourl"]) == 2
    assert "NAME=URL" in capsys.readouterr().err
    assert main(["eval", "--task", "nope.jsonl", "--endpoint", "a=http://x"]) == 2
    assert "no such task file" in capsys.readouterr().err
    assert main(["eval", "--task", "arith", "--endpoint", "a=http://x",
                 "--endpoint", "a=http://y"]) == 2
    assert "unique" in capsys.readouterr().err
    assert main(["eval", "--task", "qa_judge", "--endpoint", "a=http://x"]) == 2
    assert "--judge" in capsys.readouterr().err


def test_eval_help_explains_every_flag(capsys):
    import argparse

    from yun.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["eval"]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"--task", "--endpoint", "--endpoints", "--judge", "--mc-scoring", "--limit",
            "--concurrency", "--timeout", "--retries", "--cache", "--no-cache"} <= {
        s for a in options for s in a.option_strings}
    assert all(a.help and len(a.help) > 10 for a in options)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "McNemar" in text and "loglik" in text and "mc_facts" in text
