"""From per-item results to the report: per task and endpoint the score with its interval,
errors, latency and tokens per item; per task and pair of endpoints the paired difference,
its interval, the test and the verdict (Holm-corrected over all comparisons when there are
several). Printed as a table, written as JSON and drawn as a PNG (matplotlib, Agg)."""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

from yun.eval import stats
from yun.eval.runner import ItemResult
from yun.eval.scorers import JUDGE_PROMPT
from yun.eval.tasks import Task


@dataclass
class EndpointRow:
    task: str
    endpoint: str
    score: stats.Score
    errors: int
    latency_p50_s: float | None
    completion_tokens_mean: float | None
    prompt_tokens_mean: float | None
    first_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "endpoint": self.endpoint, **self.score.to_json(),
                "errors": self.errors, "latency_p50_s": self.latency_p50_s,
                "completion_tokens_mean": self.completion_tokens_mean,
                "prompt_tokens_mean": self.prompt_tokens_mean, "first_error": self.first_error}


@dataclass
class Summary:
    rows: list[EndpointRow]
    comparisons: list[stats.PairedComparison]  # pairs with items both answered
    not_compared: list[tuple[str, str, str]]  # (task, a, b) with no item both answered


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def endpoint_row(task: str, endpoint: str, results: list[ItemResult]) -> EndpointRow:
    ok = [r for r in results if r.score is not None]
    errs = [r for r in results if r.score is None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    return EndpointRow(
        task, endpoint, stats.score([r.score for r in ok]), len(errs),
        statistics.median(lat) if lat else None,
        _mean([r.completion_tokens for r in ok if r.completion_tokens is not None]),
        _mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        errs[0].error if errs else None)


def paired(task: str, a: str, b: str, by_item: dict[tuple[str, str], ItemResult],
           items: list[str]) -> stats.PairedComparison:
    """a vs b on the items both scored."""
    both = [i for i in items if by_item[(a, i)].score is not None
            and by_item[(b, i)].score is not None]
    return stats.compare(a, b, task, [by_item[(a, i)].score for i in both],
                         [by_item[(b, i)].score for i in both])


def summarize(tasks: list[Task], endpoints: list[str], results: list[ItemResult]) -> Summary:
    rows, comps, skipped = [], [], []
    for t in tasks:
        mine = [r for r in results if r.task == t.name]
        by_item = {(r.endpoint, r.item): r for r in mine}
        items = [it.id for it in t.items]
        for e in endpoints:
            rows.append(endpoint_row(t.name, e, [by_item[(e, i)] for i in items]))
        for a, b in itertools.combinations(endpoints, 2):
            c = paired(t.name, a, b, by_item, items)
            if c.n:
                comps.append(c)
            else:
                skipped.append((t.name, a, b))
    return Summary(rows, stats.with_holm(comps), skipped)


# ---- text ------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}"


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_scores(summary: Summary) -> str:
    header = ["task", "endpoint", "score %", "95% CI", "n", "errors", "p50 latency s",
              "out tok/item", "in tok/item"]
    rows = [[r.task, r.endpoint, _pct(r.score.mean),
             f"[{_pct(r.score.low)}, {_pct(r.score.high)}]", str(r.score.n), str(r.errors),
             _opt(r.latency_p50_s, ".2f"), _opt(r.completion_tokens_mean, ".1f"),
             _opt(r.prompt_tokens_mean, ".1f")] for r in summary.rows]
    return _table(header, rows)


def format_comparisons(summary: Summary) -> str:
    skipped = "\n".join(f"{a} vs {b} on {t}: not compared (no item answered by both)"
                        for t, a, b in summary.not_compared)
    if not summary.comparisons:
        return skipped
    header = ["task", "A vs B", "A-B pts", "95% CI", "n", "test", "A only/B only", "p",
              "p Holm"]
    rows = []
    for c in summary.comparisons:
        disc = f"{c.a_only}/{c.b_only}" if c.a_only is not None else "-"
        rows.append([c.task, f"{c.a} vs {c.b}", f"{100 * c.diff:+.1f}",
                     f"[{100 * c.low:+.1f}, {100 * c.high:+.1f}]", str(c.n), c.test, disc,
                     f"{c.p_value:.3g}", "-" if c.p_adjusted is None else f"{c.p_adjusted:.3g}"])
    verdicts = "\n".join([c.verdict() for c in summary.comparisons] + ([skipped] if skipped else []))
    return _table(header, rows) + "\n\n" + verdicts


def format_errors(summary: Summary) -> str:
    return "\n".join(f"{r.endpoint} on {r.task}: {r.errors} item(s) failed, e.g. {r.first_error}"
                     for r in summary.rows if r.errors)


# ---- files -----------------------------------------------------------------------------------
def build_payload(options: dict[str, Any], tasks: list[Task], endpoints: dict[str, dict[str, Any]],
                  summary: Summary, results: list[ItemResult],
                  requests: dict[str, int]) -> dict[str, Any]:
    judged = any(t.kind == "judge" for t in tasks)
    return {
        "options": options,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "tasks": [{"name": t.name, "kind": t.kind, "items": len(t.items), "source": t.source}
                  for t in tasks],
        "endpoints": endpoints,
        "judge_prompt": JUDGE_PROMPT if judged else None,
        "scores": [r.to_json() for r in summary.rows],
        "comparisons": [c.to_json() for c in summary.comparisons],
        "not_compared": [{"task": t, "a": a, "b": b} for t, a, b in summary.not_compared],
        "requests": requests,
        "items": [r.to_json() for r in results],
    }


def write_json(path: str, payload: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)
    return path


def plot(summary: Summary, path: str, title: str) -> str:
    """Score per task, one colour per endpoint, with the 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in summary.rows))
    names = list(dict.fromkeys(r.endpoint for r in summary.rows))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.6 * len(tasks) * max(1, len(names)) / 2), 4))
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, t in enumerate(tasks):
            row = next(r for r in summary.rows if r.task == t and r.endpoint == name)
            if row.score.n == 0:
                continue
            xs.append(j + (k - (len(names) - 1) / 2) * width)
            ys.append(100 * row.score.mean)
            lo.append(100 * (row.score.mean - row.score.low))
            hi.append(100 * (row.score.high - row.score.mean))
        ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=4, color=colours(k % 10), label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("score % (95% CI)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
