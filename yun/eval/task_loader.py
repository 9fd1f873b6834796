"""Which loader reads a task: a built-in name, our JSONL format or an lm-eval YAML file.

Its own module, so that tasks.py (the task types and our JSONL format) and lm_eval_yaml.py
(which builds those types) do not import each other.
"""

from __future__ import annotations

import os

from yun.eval.lm_eval_yaml import load_lm_eval_task
from yun.eval.tasks import TASK_DIR, Task, builtin_tasks, load_jsonl_task


def load_task(spec: str) -> Task:
    """A task from a .jsonl file, an lm-eval .yaml file, or a built-in name (yun/eval/tasks)."""
    path = os.path.expanduser(spec)
    if not os.path.exists(path) and spec in builtin_tasks():
        path = os.path.join(TASK_DIR, spec + ".jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{spec}: no such task file (built-in tasks: "
                                f"{', '.join(builtin_tasks())})")
    if path.endswith((".yaml", ".yml")):
        return load_lm_eval_task(path)
    return load_jsonl_task(path)
