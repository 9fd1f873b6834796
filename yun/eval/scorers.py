"""Per task kind: the request an item becomes, and the score (0-1) of the reply.

loglik: one /v1/completions request holding one prompt per choice (question + delimiter +
choice), `echo` with `max_tokens: 0` and `logprobs`, as lm-eval scores multiple choice:
the choice whose own tokens have the highest summed log-probability is the answer.
letter: the question and lettered choices as a chat message; the first standalone
letter of the reply is the answer. generate: the reply (chat, or a raw completion with
stop strings) matched exactly, by the task's regex, or as a number (the last number of
the reply, or the one after GSM8K's "####"). code: the reply's code (its first ``` block,
or all of it) and the item's tests run in the sandbox. judge: a judge endpoint is shown
`JUDGE_PROMPT` and answers CORRECT or INCORRECT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from yun.eval.tasks import Item, Task

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTER_INSTRUCTION = "Answer with the letter of the correct choice only."
CODE_INSTRUCTION = ("Write the Python code only, in one ```python block, with no "
                    "explanation and no example usage.")
JUDGE_PROMPT = (
    "You are grading an answer against a reference answer.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nCandidate answer:\n{answer}\n\n"
    "Is the candidate answer correct, i.e. does it agree with the reference answer in "
    "substance? Reply with exactly one word: CORRECT or INCORRECT.")


@dataclass(frozen=True)
class Request:
    path: str  # "/completions" or "/chat/completions", under the API root
    body: dict[str, Any]


@dataclass
class Graded:
    score: float | None  # None: the reply could not be scored (counted as an error)
    answer: str  # what the model answered, as shown in the report
    expected: str
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _messages(task: Task, content: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": task.options.system}] if task.options.system else []
    return system + [{"role": "user", "content": content}]


def _chat(task: Task, model: str, content: str, max_tokens: int | None = None) -> Request:
    return Request("/chat/completions", {
        "model": model, "messages": _messages(task, content), "temperature": 0,
        "max_tokens": max_tokens or task.options.max_tokens})


def loglik_context(task: Task, item: Item) -> str:
    return task.options.context_template.replace("{question}", item.prompt)


def letter_prompt(item: Item) -> str:
    lines = [item.prompt.rstrip(), ""]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines + ["", LETTER_INSTRUCTION])


def build_request(task: Task, item: Item, model: str) -> Request:
    o = task.options
    if task.kind == "loglik":
        context = loglik_context(task, item)
        prompts = [context + o.target_delimiter + c for c in item.choices]
        return Request("/completions", {"model": model, "prompt": prompts, "max_tokens": 0,
                                        "echo": True, "logprobs": 1, "temperature": 0})
    if task.kind == "letter":
        return _chat(task, model, letter_prompt(item), max_tokens=min(o.max_tokens, 16))
    if task.kind == "code":
        return _chat(task, model, item.prompt.rstrip() + "\n\n" + CODE_INSTRUCTION)
    if o.api == "completions":
        body: dict[str, Any] = {"model": model, "prompt": item.prompt, "temperature": 0,
                                "max_tokens": o.max_tokens}
        if o.stop:
            body["stop"] = list(o.stop)
        return Request("/completions", body)
    return _chat(task, model, item.prompt)


def reply_text(response: dict[str, Any]) -> str:
    choice = (response.get("choices") or [{}])[0]
    if "message" in choice:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


# ---- loglik ----------------------------------------------------------------------------------
def continuation_logprob(choice: dict[str, Any], context_chars: int) -> float:
    """Sum of the logprobs of the tokens that start at or after `context_chars` in the
    echoed text (the choice's own tokens)."""
    lp = choice.get("logprobs") or {}
    offsets, values = lp.get("text_offset") or [], lp.get("token_logprobs") or []
    if not offsets or len(offsets) != len(values):
        raise ValueError("the reply has no echoed token logprobs (does the endpoint support "
                         "`echo` with `logprobs` on /v1/completions?)")
    picked = [v for o, v in zip(offsets, values) if o >= context_chars]
    if not picked or any(v is None for v in picked):
        raise ValueError("no logprob for the choice's tokens in the echoed prompt")
    return float(sum(picked))


def grade_loglik(task: Task, item: Item, response: dict[str, Any]) -> Graded:
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != len(item.choices):
        raise ValueError(f"expected {len(item.choices)} choices in the reply, got {len(choices)}")
    context = len(loglik_context(task, item))  # the delimiter usually merges into the choice
    scores = [continuation_logprob(c, context) for c in choices]
    best = max(range(len(scores)), key=lambda i: scores[i])
    return Graded(float(best == item.answer), item.choices[best], item.choices[item.answer],
                  {"logprobs": scores})


# ---- letter ----------------------------------------------------------------------------------
def extract_letter(text: str, n: int) -> str | None:
    allowed = LETTERS[:n]
    m = re.search(rf"(?<![A-Za-z])([{allowed}])(?![A-Za-z])", text)
    return m.group(1) if m else None


def grade_letter(task: Task, item: Item, response: dict[str, Any]) -> Graded:
    text = reply_text(response)
    letter = extract_letter(text, len(item.choices))
    expected = LETTERS[item.answer]
    return Graded(float(letter == expected), letter or text.strip()[:40], expected,
                  {"reply": text})


# ---- generate --------------------------------------------------------------------------------
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> float | None:
    """GSM8K style: the number after "####" if present, else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUM.findall(tail)
    if not found:
        return None
    pick = found[0] if "####" in text else found[-1]
    try:
        return float(pick.replace(",", ""))
    except ValueError:
        return None


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def grade_generate(task: Task, item: Item, response: dict[str, Any]) -> Graded:
    text, expected = reply_text(response), str(item.answer)
    o = task.options
    if o.match == "numeric":
        got, want = extract_number(text), extract_number(expected)
        ok = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6,
                                                                    abs_tol=1e-9)
        shown = "-" if got is None else f"{got:g}"
        return Graded(float(ok), shown, expected, {"reply": text})
    if o.match == "regex":
        m = re.search(o.regex or "", text)
        got = (m.group(1) if m and m.groups() else m.group(0) if m else None)
        ok = got is not None and _normal(got) == _normal(expected)
        return Graded(float(ok), got if got is not None else "-", expected, {"reply": text})
    return Graded(float(_normal(text) == _normal(expected)), text.strip()[:80], expected,
                  {"reply": text})


# ---- code ------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    m = _FENCE.search(text)
    if m:
        return m.group(1)
    if "```" in text:  # an unclosed fence (max_tokens ran out)
        return text.split("```", 1)[1].split("\n", 1)[-1]
    return text


def grade_code(task: Task, item: Item, response: dict[str, Any]) -> Graded:
    from yun.eval.sandbox import run_python

    code = extract_code(reply_text(response))
    result = run_python(code + "\n\n" + (item.tests or ""), timeout_s=task.options.code_timeout_s,
                        memory_mb=task.options.code_memory_mb)
    return Graded(float(result.passed), result.status, "passed",
                  {"code": code, "stderr": result.stderr[-800:]})


# ---- judge -----------------------------------------------------------------------------------
def judge_request(task: Task, item: Item, answer: str, model: str) -> Request:
    prompt = JUDGE_PROMPT.format(question=item.prompt, reference=item.reference, answer=answer)
    return Request("/chat/completions", {"model": model, "temperature": 0, "max_tokens": 8,
                                         "messages": [{"role": "user", "content": prompt}]})


def grade_judge(item: Item, answer: str, judge_response: dict[str, Any]) -> Graded:
    verdict = reply_text(judge_response).strip().upper()
    m = re.search(r"\b(INCORRECT|CORRECT)\b", verdict)
    if m is None:
        return Graded(None, answer.strip()[:80], item.reference or "",
                      {"judge_reply": verdict}, error=f"the judge answered {verdict[:60]!r}")
    return Graded(float(m.group(1) == "CORRECT"), answer.strip()[:80], item.reference or "",
                  {"judge_reply": verdict})


GRADERS = {"loglik": grade_loglik, "letter": grade_letter, "generate": grade_generate,
           "code": grade_code}


def grade(task: Task, item: Item, response: dict[str, Any]) -> Graded:
    """Score one reply (kinds other than judge, which needs a second request)."""
    return GRADERS[task.kind](task, item, response)
