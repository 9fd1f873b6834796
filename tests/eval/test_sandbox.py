"""The code sandbox: passing and failing tests, and runaway solutions killed by its limits."""

from __future__ import annotations

import time

from yun.eval.sandbox import run_python
from yun.eval.scorers import grade_code
from yun.eval.task_loader import load_task


def test_passing_and_failing_tests():
    assert run_python("def f(x):\n    return x + 1\nassert f(1) == 2\n").status == "passed"
    r = run_python("def f(x):\n    return x\nassert f(1) == 2\n")
    assert r.status == "failed" and r.returncode == 1 and "AssertionError" in r.stderr


def test_an_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 5


def test_a_memory_hog_hits_the_memory_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", timeout_s=10,
                   memory_mb=200)
    assert r.status == "memory" and "MemoryError" in r.stderr


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_children_of_a_solution_are_killed_with_it(tmp_path):
    marker = tmp_path / "child.pid"
    code = ("import os, time\nif os.fork() == 0:\n"
            f"    open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
            "    time.sleep(60)\nwhile True:\n    pass\n")
    r = run_python(code, timeout_s=1.0)
    assert r.status == "timeout"
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_the_solution_sees_no_environment_and_a_fresh_directory(monkeypatch):
    monkeypatch.setenv("YUN_SECRET_FOR_TEST", "s3cret")
    code = ("import os\nassert 'YUN_SECRET_FOR_TEST' not in os.environ\n"
            "assert os.listdir('.') == ['solution_and_tests.py'], os.listdir('.')\n")
    assert run_python(code).status == "passed"


def test_grade_code_runs_the_fenced_solution_against_the_items_tests():
    task = load_task("code_small")
    item = task.items[0]  # add(a, b)
    good = {"choices": [{"message": {"content": "Here:\n```python\ndef add(a, b):\n"
                                                "    return a + b\n```\nDone."}}]}
    bad = {"choices": [{"message": {"content": "```python\ndef add(a, b):\n    return a - b\n```"}}]}
    loop = {"choices": [{"message": {"content": "def add(a, b):\n    while True:\n        pass\n"}}]}
    assert grade_code(task, item, good).score == 1.0
    assert grade_code(task, item, bad).score == 0.0
    from dataclasses import replace

    quick = replace(task, options=replace(task.options, code_timeout_s=1.0))
    graded = grade_code(quick, item, loop)
    assert graded.score == 0.0 and graded.answer == "timeout"


def test_code_task_through_the_evaluator_runaway_reply_scores_zero():
    from dataclasses import replace

    from tests.bench.conftest import live_server
    from tests.eval.fake_endpoint import build_app, last_user
    from yun.eval.cache import AnswerCache
    from yun.eval.endpoints import Endpoint
    from yun.eval.runner import RunOptions, evaluate

    task = load_task("code_small").limited(2)  # add(a, b), is_even(n)
    task = replace(task, options=replace(task.options, code_timeout_s=1.0))

    def reply(body) -> str:
        if "add(a, b)" in last_user(body):
            return "```python\ndef add(a, b):\n    return a + b\n```"
        return "```python\ndef is_even(n):\n    while True:\n        pass\n```"

    with live_server(build_app(reply)) as url:
        results, _ = evaluate([task], [Endpoint("a", url)], AnswerCache(None),
                              RunOptions(retries=0, progress=False))
    assert [(r.score, r.answer) for r in results] == [(1.0, "passed"), (0.0, "timeout")]
