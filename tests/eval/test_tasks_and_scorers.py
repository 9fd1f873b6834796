"""Task files (ours and lm-eval YAML) and the scorers, on hand-made replies; the judge
through scripted endpoints."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.bench.conftest import live_server
from tests.eval.fake_endpoint import build_app, last_user
from yun.eval import scorers
from yun.eval.cache import AnswerCache
from yun.eval.endpoints import Endpoint, load_endpoints_file, parse_endpoint
from yun.eval.runner import RunOptions, evaluate
from yun.eval.task_loader import load_task
from yun.eval.tasks import builtin_tasks


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_tasks_load_with_their_kinds():
    kinds = {name: load_task(name).kind for name in builtin_tasks()}
    assert kinds == {"arith": "generate", "code_small": "code", "mc_facts": "loglik",
                     "qa_judge": "judge"}
    assert load_task("arith").options.match == "numeric"
    mc = load_task("mc_facts")
    assert len(mc.items) >= 30 and all(len(it.choices) == 4 for it in mc.items)


def test_jsonl_kind_is_inferred_and_letter_answers_become_indexes(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "a", "question": "Pick b", "choices": ["a", "b"], "answer": "B"},
        {"id": "b", "question": "Pick a", "choices": ["a", "b"], "answer": "a"}])
    t = load_task(path)
    assert (t.name, t.kind, [it.answer for it in t.items]) == ("t", "loglik", [1, 0])


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "choices": ["a", "b"], "answer": 5}], "choice index"),
    ([{"task": {"kind": "bogus"}}, {"question": "q", "answer": "1"}], "kind must be one of"),
    ([{"task": {"colour": "red"}}, {"question": "q", "answer": "1"}], "unknown task option"),
    ([{"id": "x", "question": "q", "answer": "1"}, {"id": "x", "question": "r", "answer": "2"}],
     "not unique"),
    ([{"answer": "1"}], "needs a 'question'"),
])
def test_bad_task_files_name_the_problem(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_task(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_lm_eval_multiple_choice_yaml_over_a_local_jsonl(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [
        {"q": "Sky colour?", "options": ["green", "blue"], "label": 1},
        {"q": "Grass colour?", "options": ["green", "blue"], "label": 0}])
    (tmp_path / "base.yaml").write_text(textwrap.dedent("""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: data.jsonl
        test_split: test
        output_type: multiple_choice
        """))
    (tmp_path / "colours.yaml").write_text(textwrap.dedent("""\
        include: base.yaml
        task: colours
        doc_to_text: "Q: {{q}}\\nA:"
        doc_to_choice: "{{options}}"
        doc_to_target: label
        """))
    t = load_task(str(tmp_path / "colours.yaml"))
    assert (t.name, t.kind, len(t.items)) == ("colours", "loglik", 2)
    assert t.items[0].prompt == "Q: Sky colour?\nA:" and t.items[0].choices == ("green", "blue")
    req = scorers.build_request(t, t.items[0], "m")
    assert req.body["prompt"] == ["Q: Sky colour?\nA: green", "Q: Sky colour?\nA: blue"]


def test_lm_eval_generate_until_yaml_with_a_regex_filter(tmp_path):
    write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "work #### 4"}])
    (tmp_path / "gsm.yaml").write_text(textwrap.dedent("""\
        task: tiny_gsm
        dataset_path: json
        dataset_kwargs: {data_files: gsm.jsonl}
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{answer.split('####')[-1].strip()}}"
        generation_kwargs: {until: ["Question:"], max_gen_toks: 64}
        filter_list:
          - name: strict
            filter:
              - function: regex
                regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
              - function: take_first
        """))
    t = load_task(str(tmp_path / "gsm.yaml"))
    assert (t.kind, t.options.match, t.options.api, t.items[0].answer) == (
        "generate", "regex", "completions", "4")
    req = scorers.build_request(t, t.items[0], "m")
    assert req.path == "/completions" and req.body["stop"] == ["Question:"]
    reply = {"choices": [{"text": " 2 and 2 make 4 #### 4"}]}
    assert scorers.grade(t, t.items[0], reply).score == 1.0
    assert scorers.grade(t, t.items[0], {"choices": [{"text": " 4"}]}).score == 0.0


def test_lm_eval_features_we_do_not_read_are_refused_by_name(tmp_path):
    (tmp_path / "hub.yaml").write_text("task: x\ndataset_path: gsm8k\n")
    with pytest.raises(ValueError, match="local JSON-lines"):
        load_task(str(tmp_path / "hub.yaml"))
    (tmp_path / "fn.yaml").write_text("task: x\nprocess_docs: !function utils.process\n")
    with pytest.raises(ValueError, match="!function"):
        load_task(str(tmp_path / "fn.yaml"))


def echo_choice(index: int, tokens: list[tuple[str, float | None]]) -> dict:
    offsets, pos = [], 0
    for text, _ in tokens:
        offsets.append(pos)
        pos += len(text)
    return {"index": index, "text": "".join(t for t, _ in tokens), "logprobs": {
        "tokens": [t for t, _ in tokens], "token_logprobs": [v for _, v in tokens],
        "text_offset": offsets, "top_logprobs": None}}


def test_loglik_sums_only_the_choices_own_tokens():
    t = load_task("mc_facts")
    item = t.items[0]  # Paris is choice 2
    context_text = scorers.loglik_context(t, item)
    head = [(context_text[:-7], None), (context_text[-7:], -50.0)]  # the context: ignored
    assert "".join(x for x, _ in head) == context_text
    choices = [echo_choice(i, head + [(" " + c, lp)]) for i, (c, lp) in
               enumerate(zip(item.choices, [-5.0, -6.0, -0.5, -7.0]))]
    graded = scorers.grade_loglik(t, item, {"choices": choices})
    assert graded.score == 1.0 and graded.answer == "Paris"
    assert graded.detail["logprobs"] == [-5.0, -6.0, -0.5, -7.0]
    multi = [echo_choice(i, head + [(" Ber", -1.0), ("lin", -1.0)]) if i == 0 else
             echo_choice(i, head + [(" " + c, -1.5)]) for i, c in enumerate(item.choices)]
    graded = scorers.grade_loglik(t, item, {"choices": multi})  # Berlin: -2.0 < -1.5
    assert graded.answer == "Madrid" and graded.score == 0.0  # first of the -1.5 ties


def test_loglik_without_echoed_logprobs_is_an_error():
    t = load_task("mc_facts")
    with pytest.raises(ValueError, match="echo"):
        scorers.grade_loglik(t, t.items[0], {"choices": [{"index": i, "text": "x"}
                                                         for i in range(4)]})


@pytest.mark.parametrize("text, letter", [
    ("C", "C"), ("The answer is B.", "B"), ("(A) Berlin", "A"), ("Answer: D", "D"),
    ("I am not sure", None), ("E", None)])
def test_letter_extraction(text, letter):
    assert scorers.extract_letter(text, 4) == letter


@pytest.mark.parametrize("text, number", [
    ("The answer is 12.", 12.0), ("3 apples and 2 more make 5", 5.0),
    ("so #### 1,234 is it, not 7", 1234.0), ("-3.5", -3.5), ("none", None)])
def test_number_extraction(text, number):
    assert scorers.extract_number(text) == number


def test_endpoint_specs_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", "k123")
    e = parse_endpoint("q8=http://127.0.0.1:8000,model=smol,key=env:EVAL_TEST_KEY")
    assert (e.name, e.api_root, e.model, e.key) == ("q8", "http://127.0.0.1:8000/v1", "smol", "k123")
    with pytest.raises(ValueError, match="unknown option"):
        parse_endpoint("a=http://x,temperature=1")
    (tmp_path / "e.yaml").write_text("endpoints:\n  - {name: a, url: 'http://h/v1'}\n"
                                     "  - {name: b, url: 'http://h2', model: m}\n")
    assert [(x.name, x.api_root, x.model) for x in load_endpoints_file(str(tmp_path / "e.yaml"))] \
        == [("a", "http://h/v1", None), ("b", "http://h2/v1", "m")]


def test_judge_grades_answers_and_its_prompt_carries_question_reference_answer(tmp_path):
    task = load_task("qa_judge").limited(4)
    judged: list = []

    def candidate(body) -> str:
        return "because light is faster" if "lightning" in last_user(body) else "no idea"

    def judge(body) -> str:
        prompt = last_user(body)
        return "CORRECT" if "light is faster" in prompt.split("Candidate answer:")[1] else "INCORRECT"

    with live_server(build_app(candidate)) as a, live_server(build_app(judge, log=judged)) as j:
        results, _ = evaluate([task], [Endpoint("a", a)], AnswerCache(None),
                              RunOptions(retries=0, progress=False), judge=Endpoint("j", j))
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0]
    first = next(last_user(b) for b in judged if "lightning" in last_user(b))
    assert first == scorers.JUDGE_PROMPT.format(question=task.items[0].prompt,
                                                reference=task.items[0].reference,
                                                answer="because light is faster")
