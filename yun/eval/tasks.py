"""Tasks: our JSONL files and lm-evaluation-harness YAML tasks over a local JSONL dataset.

Our format, one JSON object a line; an optional first line `{"task": {...}}` sets the
task's name, kind and options (see `TaskOptions`). Without it the kind follows the items:

    {"id": "q1", "question": "...", "choices": ["a", "b", "c"], "answer": 1}   loglik
    {"id": "q2", "question": "What is 2+3?", "answer": "5"}                   generate
    {"id": "q3", "prompt": "Write f(x) ...", "tests": "assert f(1) == 2"}     code
    {"id": "q4", "question": "...", "reference": "a model answer"}            judge

Kinds: `loglik` (multiple choice by the log-likelihood of each choice), `letter` (the
same items, the letter a chat model answers), `generate` (exact / regex / numeric match),
`code` (unit tests in a sandbox), `judge` (a judge model compares with the reference).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

KINDS = ("loglik", "letter", "generate", "code", "judge")
MATCHES = ("exact", "regex", "numeric")
APIS = ("chat", "completions")
TASK_DIR = os.path.join(os.path.dirname(__file__), "data")  # the built-in task files


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    choices: tuple[str, ...] = ()
    answer: Any = None  # a choice index (multiple choice) or the expected text
    tests: str | None = None  # code: Python run after the solution; passes if it exits 0
    reference: str | None = None  # judge: the reference answer


@dataclass(frozen=True)
class TaskOptions:
    """What a task file's header (or an lm-eval YAML) may set."""

    name: str | None = None
    kind: str | None = None
    match: str = "exact"  # generate: exact, regex (group 1 of `regex`), numeric
    regex: str | None = None
    max_tokens: int = 256
    api: str = "chat"  # generate / judge: chat messages or a raw completions prompt
    stop: tuple[str, ...] = ()
    system: str | None = None
    # loglik: the context each choice follows ({question}: the item's text), and what
    # comes between the two
    context_template: str = "Question: {question}\nAnswer:"
    target_delimiter: str = " "
    code_timeout_s: float = 10.0
    code_memory_mb: int = 512


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    items: tuple[Item, ...]
    options: TaskOptions = field(default_factory=TaskOptions)
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.options.match not in MATCHES:
            raise ValueError(f"task {self.name}: match must be one of {MATCHES}, "
                             f"got {self.options.match!r}")
        if self.options.match == "regex" and not self.options.regex:
            raise ValueError(f"task {self.name}: match 'regex' needs a 'regex' option")
        if self.options.api not in APIS:
            raise ValueError(f"task {self.name}: api must be one of {APIS}, "
                             f"got {self.options.api!r}")
        if not self.items:
            raise ValueError(f"task {self.name}: no items")
        ids = [it.id for it in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {self.name}: item ids are not unique")
        for it in self.items:
            _check_item(self, it)

    @property
    def multiple_choice(self) -> bool:
        return self.kind in ("loglik", "letter")

    def limited(self, limit: int | None) -> "Task":
        return self if limit is None else replace(self, items=self.items[:limit])


def _check_item(task: Task, it: Item) -> None:
    where = f"task {task.name}, item {it.id}"
    if task.multiple_choice:
        if len(it.choices) < 2:
            raise ValueError(f"{where}: multiple choice needs at least 2 choices")
        if not isinstance(it.answer, int) or not 0 <= it.answer < len(it.choices):
            raise ValueError(f"{where}: answer must be a choice index below {len(it.choices)}")
    elif task.kind == "generate" and it.answer is None:
        raise ValueError(f"{where}: a generate item needs an 'answer'")
    elif task.kind == "code" and not it.tests:
        raise ValueError(f"{where}: a code item needs 'tests'")
    elif task.kind == "judge" and not it.reference:
        raise ValueError(f"{where}: a judge item needs a 'reference'")


def builtin_tasks() -> list[str]:
    return sorted(f[:-6] for f in os.listdir(TASK_DIR) if f.endswith(".jsonl"))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows


def options_from(raw: dict[str, Any], where: str) -> TaskOptions:
    known = {f.name for f in fields(TaskOptions)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown task option(s) {sorted(unknown)}; known: "
                         f"{sorted(known)}")
    if "stop" in raw:
        raw = {**raw, "stop": tuple([raw["stop"]] if isinstance(raw["stop"], str) else raw["stop"])}
    return TaskOptions(**raw)


def load_jsonl_task(path: str) -> Task:
    rows = read_jsonl(path)
    header: dict[str, Any] = {}
    if rows and "task" in rows[0] and len(rows[0]) == 1:
        header = rows.pop(0)["task"]
    options = options_from(header, path)
    items = [item_from(row, i, path) for i, row in enumerate(rows)]
    kind = options.kind or infer_kind(items, path)
    if kind == "generate" and "match" not in header and all(
            _is_number(str(it.answer)) for it in items):
        options = replace(options, match="numeric")
    name = options.name or os.path.splitext(os.path.basename(path))[0]
    return Task(name=name, kind=kind, items=tuple(items), options=options, source=path)


def item_from(row: dict[str, Any], index: int, where: str) -> Item:
    prompt = row.get("question", row.get("prompt"))
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: item {index + 1} needs a 'question' (or 'prompt') string")
    answer = row.get("answer")
    if "choices" in row and isinstance(answer, str) and answer in row["choices"]:
        answer = row["choices"].index(answer)
    elif "choices" in row and isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        answer = ord(answer.upper()) - ord("A")  # "B" -> 1
    return Item(id=str(row.get("id", index)), prompt=prompt,
                choices=tuple(str(c) for c in row.get("choices", ())), answer=answer,
                tests=row.get("tests"), reference=row.get("reference"))


def infer_kind(items: list[Item], where: str) -> str:
    first = items[0] if items else None
    if first is None:
        raise ValueError(f"{where}: no items")
    if first.choices:
        return "loglik"
    if first.tests:
        return "code"
    if first.reference:
        return "judge"
    if first.answer is not None:
        return "generate"
    raise ValueError(f"{where}: cannot tell the task's kind from its first item; give a "
                     '{"task": {"kind": ...}} header line')


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None
