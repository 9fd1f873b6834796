"""`yun bench throughput` end to end on a tiny checkpoint with shrunk workloads: the
report adds up, the ceilings are consistent with the probes, the files are written."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.conftest import VOCAB
from yun.bench.metrics import RunResult
from yun.bench.workloads import WorkloadOptions, make_workload
from yun.cli import main

SMALL = ["--scale", "0.05", "--probe-mib", "16", "--probe-repeats", "2",
         "--kv-cache-memory", "4M", "--no-progress"]


def _run(tmp_path, capsys, path: str, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "results"
    assert main(["bench", "throughput", "--model", path, "--output-dir", str(out),
                 *SMALL, *flags]) == 0
    err = capsys.readouterr().err
    (json_path,) = glob.glob(str(out / "throughput-*.json"))
    (png,) = glob.glob(str(out / "throughput-*.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5000
    with open(json_path, encoding="utf-8") as f:
        return json.load(f), err


def _within(fraction: float, stderr: str) -> None:
    """A fraction of a ceiling is in (0, 1]; on a busy shared machine a probe can catch a
    worse moment than the run, and then the report must say so."""
    assert fraction > 0
    if fraction > 1:
        assert "a roofline probe missed the machine's peak" in stderr


def _check_ceilings(run: dict, roof: dict, stderr: str) -> None:
    """The fraction is the result over a ceiling that follows from the measured probes."""
    s = run["summary"]
    bw, flops = roof["bandwidth_gb_s"] * 1e9, roof["matmul_gflop_s"] * 1e9
    assert bw == pytest.approx(max(p["value"] for p in roof["probes"]
                                   if p["unit"] == "GB/s") * 1e9)
    assert flops == pytest.approx(max(p["value"] for p in roof["probes"]
                                      if p["unit"] == "GFLOP/s") * 1e9)
    weight_bytes = roof["model"]["weight_bytes_per_token"]
    assert s["memory_floor_s"] > 0 and s["compute_floor_s"] > 0
    assert s["memory_floor_s"] * bw / weight_bytes == pytest.approx(
        round(s["memory_floor_s"] * bw / weight_bytes))  # a whole number of steps
    floor = max(s["memory_floor_s"], s["compute_floor_s"])
    assert s["ceiling_tokens_per_s"] == pytest.approx(s["output_tokens"] / floor)
    assert s["fraction_of_ceiling"] == pytest.approx(
        s["output_tokens_per_s"] / s["ceiling_tokens_per_s"])
    _within(s["fraction_of_ceiling"], stderr)


def test_mixed_with_transformers_adds_up_and_reports_ratios(tmp_path, capsys, qwen2_path):
    data, err = _run(tmp_path, capsys, qwen2_path, "--workload", "mixed", "--num-requests", "5",
                     "--compare", "transformers")
    # drawn over the model's vocabulary, as the bench draws it
    expected = make_workload("mixed", WorkloadOptions(num_requests=5, scale=0.05,
                                                      vocab_size=VOCAB))
    assert data["workload"]["output_tokens"] == sum(r.max_tokens for r in expected.requests)
    assert data["workload"]["prompt_tokens"] == sum(r.num_prompt_tokens
                                                    for r in expected.requests)
    yun, peer = data["runs"]
    assert yun["summary"]["system"] == "yun"
    assert peer["summary"]["system"].startswith("transformers (")
    assert set(peer["summary"]["modes_tried_tokens_per_s"]) == {"static batches of 16",
                                                                "continuous batching"}
    for run in (yun, peer):
        s = run["summary"]
        assert (s["completed"], s["errors"]) == (5, 0)
        assert [r["output_tokens"] for r in run["requests"]] == \
            [r.max_tokens for r in expected.requests]
        assert s["output_tokens"] == data["workload"]["output_tokens"]
        assert s["output_tokens_per_s"] == pytest.approx(s["output_tokens"] / s["duration_s"])
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(s[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"] <= s["duration_s"] + 1e-6
        _check_ceilings(run, data["roofline"], err)
    (ratio,) = data["ratios"]
    assert ratio["output_tokens_per_s"] == pytest.approx(
        yun["summary"]["output_tokens_per_s"] / peer["summary"]["output_tokens_per_s"])


def test_single_reports_decode_speed_against_the_batch_1_ceiling(tmp_path, capsys,
                                                                  qwen2_path):
    data, err = _run(tmp_path, capsys, qwen2_path, "--workload", "single", "--temperature", "0.8")
    (run,) = data["runs"]
    s = run["summary"]
    assert s["output_tokens"] == 13 and s["prompt_tokens"] == 6  # 256 and 128 x 0.05
    (req,) = run["requests"]
    assert s["decode_tokens_per_s"] == pytest.approx(12 / (req["e2e"] - req["ttft"]))
    assert s["decode_ceiling_tokens_per_s"] == pytest.approx(
        data["roofline"]["decode_ceiling_tokens_per_s"])
    assert s["decode_fraction_of_ceiling"] == pytest.approx(
        s["decode_tokens_per_s"] / s["decode_ceiling_tokens_per_s"])
    _within(s["decode_fraction_of_ceiling"], err)
    _check_ceilings(run, data["roofline"], err)
    # The JSON holds everything: the run comes back whole, and `yun bench plot` redraws it.
    assert RunResult.from_json(run).summary() == s
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(data), encoding="utf-8")
    assert main(["bench", "plot", str(saved)]) == 0
    with open(tmp_path / "saved.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_runs_each_concurrency_level(tmp_path, capsys, qwen2_path):
    data, _ = _run(tmp_path, capsys, qwen2_path, "--workload", "sweep",
                   "--concurrency-levels", "1,3", "--num-requests", "3", "--no-roofline")
    assert data["roofline"] is None
    assert [r["summary"]["concurrency"] for r in data["runs"]] == [1, 3]
    levels = data["workload"]["levels"]
    for run in data["runs"]:
        s = run["summary"]
        assert s["errors"] == 0
        assert s["output_tokens"] == levels[str(s["concurrency"])]["output_tokens"]
