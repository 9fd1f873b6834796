"""`yun bench serve`: the load generator against live HTTP servers (a fake OpenAI
endpoint whose streams we control, and yun's own server), and llama-server's start/stop."""

from __future__ import annotations

import glob
import json
import math
import os
import stat
import sys

import pytest

from tests.conftest import SMALL_ORDINARY
from yun.bench.online import ClientOptions, arrival_offsets, run_workload
from yun.bench.workloads import WorkloadOptions, make_workload
from yun.cli import main

from .conftest import live_server
from .fake_openai import MODEL, build_fake_app

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _serve(tmp_path, url: str, *flags: str) -> tuple[int, dict]:
    out = tmp_path / "results"
    code = main(["bench", "serve", "--base-url", url, "--output-dir", str(out),
                 "--no-progress", *flags])
    (path,) = glob.glob(str(out / "serve-*.json"))
    assert os.path.getsize(path.replace(".json", ".png")) > 5000
    with open(path, encoding="utf-8") as f:
        return code, json.load(f)


def test_client_counts_tokens_from_usage_and_errors_from_status(tmp_path):
    seen: list[dict] = []
    app = build_fake_app(tokens_per_chunk=2, fail_mod=3, seen=seen)
    flags = ["--workload", "mixed", "--num-requests", "8", "--scale", "0.05",
             "--concurrency", "3", "--workload-seed", "5"]
    with live_server(app) as url:
        code, data = _serve(tmp_path, url, *flags)
    workload = make_workload("mixed", WorkloadOptions(num_requests=8, scale=0.05, seed=5))
    failing = [r.prompt_token_ids[0] % 3 == 0 for r in workload.requests]
    assert 0 < sum(failing) < 8  # the seed gives both kinds
    (run,) = data["runs"]
    s = run["summary"]
    assert code == 1  # some requests failed
    assert (s["completed"], s["errors"]) == (8 - sum(failing), sum(failing))
    assert s["system"] == f"openai {MODEL}" and s["concurrency"] == 3
    ok = [r for r, bad in zip(workload.requests, failing) if not bad]
    # two tokens per chunk, but usage says how many: every output has its exact length
    assert s["output_tokens"] == sum(r.max_tokens for r in ok)
    assert s["outputs_not_of_requested_length"] == 0
    for rec, req, bad in zip(run["requests"], workload.requests, failing):
        if bad:
            assert rec["error"].startswith("HTTP 500") and rec["e2e"] is None
        else:
            assert rec["output_tokens"] == req.max_tokens
            assert len(rec["itls"]) == math.ceil(req.max_tokens / 2) - 1
            assert 0 < rec["ttft"] <= rec["e2e"]
    body = seen[-1]  # what a request looks like on the wire (the last is not the warm-up)
    assert body["model"] == MODEL and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    prompts = [b["prompt"] for b in seen[1:]]
    assert sorted(prompts) == sorted(r.prompt_token_ids for r in workload.requests)


def test_text_backend_sends_decoded_prompts_and_counts_chunks(tmp_path, qwen2_path):
    seen: list[dict] = []
    workload = make_workload("mixed", WorkloadOptions(num_requests=3, scale=0.05))
    with live_server(build_fake_app(seen=seen)) as url:
        opts = ClientOptions(base_url=url + "/v1", backend="transformers", tokenizer=qwen2_path,
                             request_rate=50.0, progress=False)
        (res,) = run_workload(opts, workload)
    assert all(isinstance(b["prompt"], str) and "ignore_eos" not in b for b in seen)
    assert res.request_rate == 50.0 and res.num_errors == 0
    assert [r.output_tokens for r in res.records] == [r.max_tokens for r in workload.requests]
    assert [r.start for r in res.records] == sorted(r.start for r in res.records)


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = arrival_offsets(2000, 10.0, seed=1)
    assert a == arrival_offsets(2000, 10.0, seed=1) and a != arrival_offsets(2000, 10.0, seed=2)
    assert a[0] == 0 and a == sorted(a)
    assert 2000 / a[-1] == pytest.approx(10.0, rel=0.1)
    assert arrival_offsets(3, math.inf, seed=1) == [0.0, 0.0, 0.0]


def test_against_yun_server(tmp_path, qwen2_path):
    pytest.importorskip("yun.server.app")
    from yun.config import EngineConfig
    from yun.engine.async_engine import AsyncEngine
    from yun.server.app import build_app
    from yun.server.settings import ServerSettings

    engine = AsyncEngine(EngineConfig(model=qwen2_path, kv_cache_memory=4 * 2**20))
    try:
        app = build_app(engine, ServerSettings(port=0, served_model_name="tiny"))
        with live_server(app) as url:
            code, data = _serve(tmp_path, url, "--workload", "shared-prefix",
                                "--num-requests", "4", "--scale", "0.05", "--num-prefixes", "2",
                                "--backend", "yun", "--request-rate", "100",
                                "--vocab-size", str(SMALL_ORDINARY))  # the tokenizer's ids
    finally:
        engine.shutdown()
    assert code == 0
    (run,) = data["runs"]
    s = run["summary"]
    assert (s["completed"], s["errors"], s["system"]) == (4, 0, "yun tiny")
    assert s["output_tokens"] == data["workload"]["output_tokens"] == 4 * 3
    assert s["prompt_tokens"] == data["workload"]["prompt_tokens"] == 4 * (51 + 3)
    assert s["outputs_not_of_requested_length"] == 0
    assert s["request_rate"] == 100.0


def test_llama_cpp_peer_starts_the_server_measures_and_stops_it(tmp_path):
    from yun.bench import baselines

    script = tmp_path / "llama-server"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {REPO!r})\n"
                      "from tests.bench.fake_openai import fake_llama_server\n"
                      "fake_llama_server(sys.argv[1:])\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    gguf = tmp_path / "model-bf16.gguf"
    gguf.write_bytes(b"GGUF")
    workload = make_workload("single", WorkloadOptions(scale=0.05))
    opts = baselines.LlamaCppOptions(binary=str(script), gguf=str(gguf), threads=2,
                                     log_path=str(tmp_path / "llama.log"))
    (res,) = baselines.run_llama_cpp(opts, workload, progress=False)
    assert res.system == "llama.cpp" and res.num_errors == 0
    assert res.output_tokens == 13
    cmd = res.extra["command"].split()
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-t") + 1] == "2"
    assert int(cmd[cmd.index("-c") + 1]) == 16 * 256  # 16 slots of the longest request
    port = int(cmd[cmd.index("--port") + 1])
    import httpx

    with pytest.raises(httpx.ConnectError):  # stopped
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_per_chunk_usage_counts_tokens_that_decode_to_no_text():
    from yun.bench.online import _Stream

    s = _Stream()
    chunk = lambda text, n, reason=None: {  # noqa: E731
        "choices": [{"index": 0, "text": text, "finish_reason": reason}],
        "usage": {"prompt_tokens": 4, "completion_tokens": n}}
    s.on_chunk(chunk("", 1), 1.0)  # a token with no text yet
    s.on_chunk(chunk("ab", 3), 2.0)
    s.on_chunk(chunk("", 3, "length"), 3.0)  # the end: no new token
    s.on_chunk({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, 4.0)
    assert s.token_times == [1.0, 2.0] and s.choice_times == [1.0, 2.0, 3.0]
    assert s.usage["completion_tokens"] == 3
