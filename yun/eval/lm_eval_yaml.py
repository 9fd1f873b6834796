"""lm-evaluation-harness task YAML, where that is cheap: a local JSON-lines dataset
(`dataset_path: json` with `dataset_kwargs.data_files`, or a path to a .jsonl file),
`doc_to_text` / `doc_to_target` / `doc_to_choice` as a field name, a Jinja template or a
literal list, `output_type` multiple_choice (scored by log-likelihood, as lm-eval does)
or generate_until (exact match, or the first `regex` filter of `filter_list`),
`description`, `target_delimiter`, `generation_kwargs.until / max_gen_toks`, and one
level of `include`. Zero-shot only; hub datasets and `!function` hooks are refused with
a message naming them.
"""

from __future__ import annotations

import ast
import os
from typing import Any

import jinja2

from yun.eval.tasks import Item, Task, TaskOptions, read_jsonl

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined)


def _loader():
    """yaml.SafeLoader that names `!function` hooks instead of failing obscurely."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def refuse(loader, node):
        raise ValueError(f"!function {node.value}: Python hooks in lm-eval YAML are not "
                         "supported by yun eval")

    Loader.add_constructor("!function", refuse)
    return Loader


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=_loader()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a task mapping")
    if "include" in doc:
        base = read_yaml(os.path.join(os.path.dirname(path), doc.pop("include")))
        doc = {**base, **doc}
    return doc


def _data_file(doc: dict[str, Any], folder: str, path: str) -> str:
    dp = doc.get("dataset_path")
    kwargs = doc.get("dataset_kwargs") or {}
    if dp in ("json", "jsonl") and "data_files" in kwargs:
        files = kwargs["data_files"]
        if isinstance(files, dict):
            split = doc.get("test_split") or doc.get("validation_split") or next(iter(files))
            if split not in files:
                raise ValueError(f"{path}: split {split!r} not in data_files {sorted(files)}")
            files = files[split]
        if isinstance(files, list):
            if len(files) != 1:
                raise ValueError(f"{path}: give one data file per split, got {files}")
            files = files[0]
        return os.path.join(folder, os.path.expanduser(str(files)))
    if isinstance(dp, str) and dp.endswith((".jsonl", ".json")):
        return os.path.join(folder, os.path.expanduser(dp))
    raise ValueError(f"{path}: dataset_path {dp!r}: yun eval reads local JSON-lines datasets "
                     "only (dataset_path: json with dataset_kwargs.data_files: FILE.jsonl)")


def render(spec: Any, doc: dict[str, Any]) -> Any:
    """lm-eval's doc_to_*: a field name, a Jinja template, or a literal value."""
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        if "{{" in spec or "{%" in spec:
            return _ENV.from_string(spec).render(**doc)
        return spec
    return spec


def _choices(spec: Any, doc: dict[str, Any]) -> list[str]:
    value = render(spec, doc)
    if isinstance(value, str):  # a template that printed a list
        value = ast.literal_eval(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"doc_to_choice gave {value!r}, not a list")
    return [str(v) for v in value]


def _target_index(target: Any, choices: list[str]) -> int:
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, int):
        return target
    if target in choices:
        return choices.index(target)
    raise ValueError(f"doc_to_target {target!r} is neither a choice index nor a choice")


def _regex_filter(doc: dict[str, Any]) -> str | None:
    for flt in doc.get("filter_list") or []:
        for step in flt.get("filter") or []:
            if step.get("function") == "regex" and step.get("regex_pattern"):
                return step["regex_pattern"]
    return None


def load_lm_eval_task(path: str) -> Task:
    doc = read_yaml(path)
    name = str(doc.get("task") or os.path.splitext(os.path.basename(path))[0])
    rows = read_jsonl(_data_file(doc, os.path.dirname(os.path.abspath(path)), path))
    out_type = doc.get("output_type", "generate_until")
    description = str(doc.get("description") or "")
    text_spec, target_spec = doc.get("doc_to_text", "question"), doc.get("doc_to_target", "answer")
    items = []
    for i, row in enumerate(rows):
        prompt = description + str(render(text_spec, row))
        target = render(target_spec, row)
        if out_type == "multiple_choice":
            choices = _choices(doc.get("doc_to_choice"), row)
            items.append(Item(str(row.get("id", i)), prompt, tuple(choices),
                              _target_index(target, choices)))
        elif out_type == "generate_until":
            items.append(Item(str(row.get("id", i)), prompt, answer=str(target)))
        else:
            raise ValueError(f"{path}: output_type {out_type!r} is not supported "
                             "(multiple_choice, generate_until)")
    gen = doc.get("generation_kwargs") or {}
    regex = _regex_filter(doc)
    options = TaskOptions(
        name=name, kind="loglik" if out_type == "multiple_choice" else "generate",
        match="regex" if regex else "exact", regex=regex,
        max_tokens=int(gen.get("max_gen_toks", 256)), api="completions",
        stop=tuple(gen.get("until") or ()), context_template="{question}",
        target_delimiter=str(doc.get("target_delimiter", " ")))
    return Task(name=name, kind=options.kind or "generate", items=tuple(items),
                options=options, source=path)
