"""Results as a table on stdout, a JSON file and a PNG plot (matplotlib, Agg backend).

Plots: throughput vs concurrency with the ceiling line for a sweep; otherwise tokens/s
per system against the ceiling and a latency CDF (TTFT, or inter-token for one request). Ratios are yun's number over each peer's, in one run (>1: yun is better;
for latencies the peer's over yun's, so >1 still means yun is better).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

from yun.bench.metrics import RunResult

REFERENCE = "yun"


# ---- text ----------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}" if v >= 0.1 else f"{v * 1e3:.1f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _triple(p: dict[str, float | None], fmt) -> str:
    return "/".join(fmt(p[k]) for k in ("p50", "p90", "p99"))


def format_table(results: list[RunResult]) -> str:
    """One row per run; latencies as p50/p90/p99; load: c=N (most in flight), a request
    rate, or all (every request submitted at once)."""
    header = ["system", "load", "ok/err", "out tok", "time s", "tok/s", "req/s",
              "TTFT ms p50/90/99", "TPOT ms p50/90/99", "E2E s p50/90/99", "% ceiling"]
    rows = [header]
    for r in results:
        s = r.summary()
        rows.append([
            r.system, _load(r),
            f"{s['completed']}/{s['errors']}", str(s["output_tokens"]), f"{r.duration:.2f}",
            f"{s['output_tokens_per_s']:.1f}", f"{s['requests_per_s']:.2f}",
            _triple(s["ttft_s"], _ms), _triple(s["tpot_s"], _ms), _triple(s["e2e_s"], _s),
            _pct(s.get("fraction_of_ceiling")),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [_decode_note(r) for r in results] + [_spec_note(r) for r in results]
    return "\n".join(lines + [n for n in notes if n])


def _spec_note(r: RunResult) -> str:
    spec = r.extra.get("speculative")
    if spec is None:
        sha = r.extra.get("output_sha256")
        return f"{r.system}: outputs {sha}" if sha else ""
    by_pos = " ".join(f"{x:.2f}" for x in spec["acceptance_by_position"])
    return (f"{r.system}: {spec['accepted']}/{spec['proposed']} proposed tokens accepted "
            f"({spec['acceptance_rate']:.1%}); by position: {by_pos or '-'}; proposer "
            f"{spec.get('proposer_ms_per_step', 0.0):.1f} ms/step; outputs "
            f"{r.extra.get('output_sha256', '?')}")


def _load(r: RunResult) -> str:
    """How the requests came: a concurrency, a request rate, or all at once."""
    parts = []
    if r.concurrency is not None:
        parts.append(f"c={r.concurrency}")
    if r.request_rate is not None:
        parts.append(f"{r.request_rate:g} req/s")
    return ", ".join(parts) or "all"


def _decode_note(r: RunResult) -> str:
    d = r.extra.get("decode_tokens_per_s")
    if d is None:
        return ""
    frac = r.extra.get("decode_fraction_of_ceiling")
    ceiling = r.extra.get("decode_ceiling_tokens_per_s")
    tail = f" = {_pct(frac)} of the batch-1 ceiling {ceiling:.1f} tok/s" if frac else ""
    return f"{r.system}: decode {d:.1f} tok/s after the first token{tail}"


def format_roofline(roofline: dict[str, Any]) -> str:
    m = roofline["model"]
    lines = [f"roofline ({roofline['threads']} threads):"]
    for p in roofline["probes"]:
        lines.append(f"  {p['name']:<32} {p['value']:8.1f} {p['unit']:<8} {p['detail']}")
    lines += [
        f"  best bandwidth {roofline['bandwidth_gb_s']:.1f} GB/s, best matmul "
        f"{roofline['matmul_gflop_s']:.1f} GFLOP/s",
        f"  model: {m['total_params'] / 1e6:.1f}M parameters stored, "
        f"{m['matmul_params_per_token'] / 1e6:.1f}M matmul parameters per token, "
        f"{m['weight_bytes_per_token'] / 1e6:.1f} MB read per decode step ({m['dtype']})",
        f"  batch-1 decode ceiling {roofline['decode_ceiling_tokens_per_s']:.1f} tok/s",
    ]
    return "\n".join(lines)


def ratios(results: list[RunResult]) -> list[dict[str, Any]]:
    """yun against each peer, phase by phase (same concurrency)."""
    ours = {r.concurrency: r for r in results if r.system == REFERENCE}
    out = []
    for peer in results:
        mine = ours.get(peer.concurrency)
        if peer.system == REFERENCE or mine is None:
            continue
        a, b = mine.summary(), peer.summary()
        out.append({
            "peer": peer.system, "concurrency": peer.concurrency,
            "output_tokens_per_s": _ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
            "ttft_p50": _ratio(b["ttft_s"]["p50"], a["ttft_s"]["p50"]),
            "tpot_p50": _ratio(b["tpot_s"]["p50"], a["tpot_s"]["p50"]),
            "e2e_p50": _ratio(b["e2e_s"]["p50"], a["e2e_s"]["p50"]),
            "decode_tokens_per_s": _ratio(a.get("decode_tokens_per_s"),
                                          b.get("decode_tokens_per_s")),
        })
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_ratios(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["yun vs peers (>1: yun better; same run, same machine):"]
    for r in rows:
        conc = "" if r["concurrency"] is None else f" @ concurrency {r['concurrency']}"
        parts = [f"{k.replace('_', ' ')} x{v:.2f}" for k, v in r.items()
                 if k not in ("peer", "concurrency") and v is not None]
        lines.append(f"  vs {r['peer']}{conc}: " + ", ".join(parts))
    return "\n".join(lines)


def ceiling_warnings(results: list[RunResult]) -> list[str]:
    out = []
    for r in results:
        for key in ("fraction_of_ceiling", "decode_fraction_of_ceiling"):
            f = r.extra.get(key)
            if f is not None and f > 1.0:
                out.append(f"warning: {r.system} reached {f * 100:.0f}% of a ceiling "
                           f"({key}): a roofline probe missed the machine's peak")
    return out


# ---- files ---------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def write_json(path: str, payload: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=_jsonable)
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    return str(v)


def build_payload(command: str, argv: list[str], workload: dict[str, Any],
                  options: dict[str, Any], results: list[RunResult],
                  roofline: dict[str, Any] | None) -> dict[str, Any]:
    return {"command": command, "argv": argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
            "workload": workload, "options": options, "roofline": roofline,
            "runs": [r.to_json() for r in results], "ratios": ratios(results)}


def output_stem(output_dir: str, command: str, workload: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(output_dir, f"{command}-{workload}-{stamp}")


# ---- plots ---------------------------------------------------------------------------------
def plot(results: list[RunResult], path: str, title: str, sweep: bool) -> str:
    """Throughput (and TPOT) vs concurrency for a sweep; otherwise tokens/s per system
    beside the ceiling, and a latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if sweep:
        _plot_sweep(axes, results)
    else:
        _plot_cdfs(axes, results)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_system(results: list[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.system, []).append(r)
    return groups


def _plot_sweep(axes, results: list[RunResult]) -> None:
    thr, lat = axes
    for system, runs in _by_system(results).items():
        runs = sorted(runs, key=lambda r: r.concurrency or 0)
        xs = [r.concurrency for r in runs]
        thr.plot(xs, [r.output_tokens_per_s for r in runs], marker="o", label=system)
        lat.plot(xs, [(r.summary()["tpot_s"]["p50"] or 0) * 1e3 for r in runs], marker="o",
                 label=system)
    ceil = sorted({(r.concurrency, r.extra["ceiling_tokens_per_s"]) for r in results
                   if r.system == REFERENCE and "ceiling_tokens_per_s" in r.extra})
    if ceil:
        thr.plot([c for c, _ in ceil], [v for _, v in ceil], "k--", label="ceiling (roofline)")
    for ax, ylabel in ((thr, "output tokens/s"), (lat, "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    thr.set_title("throughput vs concurrency")
    lat.set_title("time per output token vs concurrency")


def _plot_cdfs(axes, results: list[RunResult]) -> None:
    """Left: output tokens/s per system against the roofline ceiling. Right: the TTFT
    CDF, or for a single request (one TTFT) the inter-token latency CDF."""
    bars, cdf = axes
    names = [r.system for r in results]
    speeds = [r.extra.get("decode_tokens_per_s") or r.output_tokens_per_s for r in results]
    labels = [n.replace(" (", "\n(", 1) for n in names]  # long peer names on two lines
    bars.bar(range(len(names)), speeds, color=[f"C{i}" for i in range(len(results))],
             tick_label=labels)
    bars.tick_params(axis="x", labelsize=8)
    for i, v in enumerate(speeds):
        bars.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=9)
    single = all(len(r.completed) <= 1 for r in results)
    key = "decode_ceiling_tokens_per_s" if single else "ceiling_tokens_per_s"
    ceiling = next((r.extra[key] for r in results if key in r.extra), None)
    if ceiling:
        bars.axhline(ceiling, color="k", linestyle="--", label=f"ceiling {ceiling:.1f}")
        bars.legend(fontsize=8)
    bars.set_ylabel("decode tokens/s" if single else "output tokens/s")
    bars.set_title("throughput (higher is better)")
    bars.grid(True, axis="y", alpha=0.3)
    key, label = ("itls", "inter-token latency (ms)") if single else ("ttft", "TTFT (s)")
    for r in results:
        if key == "itls":
            values = sorted(v * 1e3 for x in r.completed for v in x.itls)
        else:
            values = sorted(x.ttft for x in r.completed if x.ttft is not None)
        if not values:
            continue
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        cdf.step(values, fractions, where="post", label=r.system,
                 marker="o" if len(values) < 8 else None)
    cdf.set_xlabel(label)
    cdf.set_ylabel("fraction")
    cdf.set_ylim(0, 1.02)
    cdf.grid(True, alpha=0.3)
    cdf.legend(fontsize=8)
    cdf.set_title(f"{label.split(' (')[0]} CDF")
