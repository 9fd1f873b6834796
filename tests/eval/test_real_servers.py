"""Two real yun servers, SmolLM2-135M-Instruct requantized to Q8_0 and to Q4_0 (from the
shipped Q4_1 file, llama-quantize --allow-requantize), plus the Q8_0 server asked a second
time under another name: the report must agree with its own per-item results (scores,
differences, intervals, McNemar's counts), and the server compared with itself must not
differ significantly. Small on purpose: 8 multiple-choice items by log-likelihood and 3
arithmetic items with 8 new tokens."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tests.gguf.conftest import quantize, require_quantize, require_smollm2
from tests.server.conftest import LiveServer
from yun.eval import report
from yun.eval.cache import AnswerCache
from yun.eval.endpoints import Endpoint
from yun.eval.runner import RunOptions, evaluate
from yun.eval.task_loader import load_task

QTYPES = ("Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from yun.config import EngineConfig
    from yun.engine.async_engine import AsyncEngine
    from yun.server import ServerSettings, build_app

    source = require_smollm2()
    require_quantize()
    folder = tmp_path_factory.mktemp("smollm2-quants")
    started = []
    try:
        for q in QTYPES:
            path = quantize(source, folder / f"SmolLM2-135M-Instruct.{q}.gguf", q, requantize=True)
            engine = AsyncEngine(EngineConfig(model=path, kv_cache_memory=32 * 2**20,
                                              num_threads=1))
            app = build_app(engine, ServerSettings(port=0, served_model_name=f"smollm2-{q}"))
            started.append(LiveServer(app, engine).start())
        yield {q: s.url for q, s in zip(QTYPES, started)}
    finally:
        for s in started:
            s.stop()
            s.engine.shutdown()


def test_two_quantizations_give_a_consistent_paired_table(servers, tmp_path):
    arith = load_task("arith").limited(3)
    arith = replace(arith, options=replace(arith.options, max_tokens=8))
    tasks = [load_task("mc_facts").limited(8), arith]
    endpoints = [Endpoint("q8", servers["Q8_0"]), Endpoint("q8-again", servers["Q8_0"]),
                 Endpoint("q4", servers["Q4_0"])]
    cache = AnswerCache(str(tmp_path / "cache.jsonl"))
    start = time.perf_counter()
    results, ev = evaluate(tasks, endpoints, cache,
                           RunOptions(concurrency=8, timeout_s=120, retries=0, progress=False))
    took = time.perf_counter() - start
    assert ev.models == {"q8": "smollm2-Q8_0", "q8-again": "smollm2-Q8_0", "q4": "smollm2-Q4_0"}
    assert [r for r in results if r.error] == []
    assert ev.stats.requests_sent == 3 * 11  # nothing shared between names
    summary = report.summarize(tasks, [e.name for e in endpoints], results)
    by = {(r.task, r.endpoint, r.item): r for r in results}
    rows = {(r.task, r.endpoint): r for r in summary.rows}
    for (task, name), row in rows.items():
        mine = [r.score for r in results if r.task == task and r.endpoint == name]
        assert row.score.mean == pytest.approx(sum(mine) / len(mine))
        assert row.score.low <= row.score.mean <= row.score.high
        assert row.latency_p50_s is not None and row.latency_p50_s > 0
    for r in results:  # every loglik reply scored all four choices
        if r.task == "mc_facts":
            assert len(r.detail["logprobs"]) == 4 and all(v < 0 for v in r.detail["logprobs"])
        else:
            assert 0 < r.completion_tokens <= 8
    assert len(summary.comparisons) == 6
    for c in summary.comparisons:
        a, b = rows[(c.task, c.a)].score, rows[(c.task, c.b)].score
        assert c.diff == pytest.approx(a.mean - b.mean)  # every item answered by both
        assert c.low - 1e-12 <= c.diff <= c.high + 1e-12
        ids = [it.id for t in tasks if t.name == c.task for it in t.items]
        sa = [by[(c.task, c.a, i)].score for i in ids]
        sb = [by[(c.task, c.b, i)].score for i in ids]
        assert (c.a_only, c.b_only) == (sum(x > y for x, y in zip(sa, sb)),
                                        sum(x < y for x, y in zip(sa, sb)))
        assert c.p_adjusted is not None and c.p_adjusted >= c.p_value
        if c.b == "q8-again":
            assert not c.significant and "no significant difference" in c.verdict()
    # a rerun is served from the cache alone, with the same table
    again, ev2 = evaluate(tasks, endpoints, AnswerCache(str(tmp_path / "cache.jsonl")),
                          RunOptions(retries=0, progress=False))
    assert ev2.stats.requests_sent == 0
    assert [r.score for r in again] == [r.score for r in results]
    print(f"\nevaluated in {took:.1f} s\n" + report.format_scores(summary) + "\n\n" + report.format_comparisons(summary))
