"""Tensor parallelism with 2 CPU ranks (gloo) on tiny random checkpoints: the same greedy
tokens (and logprobs, to float32 rounding) as one process for a dense model and for
mixture-of-experts models; a killed worker fails the server clearly (503, an error event
on the open stream), never a hang.

Each TP engine starts a worker process (about 8 s here), so the dense engine is shared
by the serving tests and killed by the last one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import pytest
import torch

from tests.conftest import build_checkpoint
from tests.helpers import stream_in_thread
from tests.models.test_moe_mla import ARCHS as MOE_ARCHS
from tests.models.test_moe_mla import adjust_checkpoint
from tests.server.conftest import LiveServer
from yun import LLM, SamplingParams
from yun.config import EngineConfig, ModelConfig
from yun.distributed.parallel import WorkerDiedError
from yun.distributed.tp import check_shardable
from yun.engine.async_engine import AsyncEngine
from yun.server import ServerSettings, build_app

KV_BYTES = 4 * 2**20
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
# 4096: the small test tokenizer's <|endoftext|>
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9] * (i + 1) for i in range(3)] + [[4096, 40, 1079]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # the engines here set torch's thread count: restore it afterwards
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference(path: str, prompts=PROMPTS, params=GREEDY):
    llm = LLM(path, dtype="float32", num_threads=1, kv_cache_memory=KV_BYTES)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def assert_same_generations(ours, ref) -> None:
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for tok in la:
                assert math.isclose(la[tok].logprob, lb[tok].logprob, abs_tol=1e-4)


# ---- dense: served over HTTP, then killed ------------------------------------------------
@pytest.fixture(scope="module")
def dense_path(checkpoint_factory) -> str:
    # Qwen2 with tied embeddings and QKV bias; one KV head for two ranks (replicated).
    return checkpoint_factory("qwen2", num_key_value_heads=1)


@pytest.fixture(scope="class")
def tp_server(dense_path):
    """Shut down after its class: a process holds one torch.distributed group at a time."""
    engine = AsyncEngine(EngineConfig(model=dense_path, dtype="float32",
                                      kv_cache_memory=KV_BYTES, tensor_parallel_size=2))
    live = LiveServer(build_app(engine, ServerSettings(port=0, served_model_name="tiny")),
                      engine).start()
    yield live
    live.stop()
    engine.shutdown()
    assert engine.engine.tp.workers[0].poll() is not None  # the worker is gone


class TestServedByTwoRanks:
    """One TP engine behind the HTTP server; the last test kills its worker."""

    def test_tp2_serves_the_same_greedy_tokens_and_logprobs_as_one_process(self, tp_server,
                                                                            dense_path):
        ref = reference(dense_path)
        client = tp_server.client()
        for prompt, want in zip(PROMPTS, ref):
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                            temperature=0, logprobs=2,
                                            extra_body={"ignore_eos": True})
            lps = got.choices[0].logprobs
            assert lps.tokens and len(lps.tokens) == 12
            want_out = want.outputs[0]
            want_lps = [lp[t].logprob for lp, t in zip(want_out.logprobs, want_out.token_ids)]
            assert lps.token_logprobs == pytest.approx(want_lps, abs=1e-4)
            assert got.choices[0].text == want.outputs[0].text

    def test_tp2_prompt_logprobs_match_one_process(self, tp_server, dense_path):
        """echo + logprobs scores the prompt: the workers compute those logits rows too."""
        prompt = PROMPTS[2]
        ref = reference(dense_path, [prompt], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        got = tp_server.client().completions.create(model="tiny", prompt=prompt, max_tokens=0,
                                                    echo=True, logprobs=1)
        ours = got.choices[0].logprobs.token_logprobs
        assert ours[0] is None and len(ours) == len(prompt)
        for o, entry, tok in zip(ours[1:], ref.prompt_logprobs[1:], prompt[1:]):
            assert math.isclose(o, entry[tok].logprob, abs_tol=1e-4)

    def test_killed_worker_fails_the_open_stream_and_health(self, tp_server):
        """Kept last: it kills the class's TP worker."""
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 400, "stream": True,
                "temperature": 0, "ignore_eos": True}
        t, events, first = stream_in_thread(tp_server.url + "/v1/completions", body)
        assert first.wait(30)
        worker = tp_server.engine.engine.tp.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive(), "the stream hung after the worker died"
        errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
        assert len(errors) == 1, events[-3:]
        assert "rank 1" in errors[0]["message"] and "SIGKILL" in errors[0]["message"]
        with tp_server.http() as http:
            health = http.get("/health")
            assert health.status_code == 503
            r = http.post("/v1/completions",
                          json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503


# ---- mixture of experts (and MLA), offline ------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2_moe", "deepseek_v3"])
def test_tp2_moe_gives_the_same_greedy_tokens_as_one_process(tmp_path, kind):
    folder = str(tmp_path)
    build_checkpoint(folder, MOE_ARCHS[kind])
    adjust_checkpoint(folder)
    ref = reference(folder)
    llm = LLM(folder, dtype="float32", kv_cache_memory=KV_BYTES, tensor_parallel_size=2)
    try:
        assert_same_generations(llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                             GREEDY), ref)
    finally:
        llm.shutdown()


# ---- no worker process ---------------------------------------------------------------------
def test_a_model_that_does_not_split_is_refused_before_starting_workers(checkpoint_factory):
    cfg = ModelConfig.from_folder(checkpoint_factory("qwen2"))  # 4 heads, 2 KV heads
    check_shardable(cfg, 2)
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        check_shardable(cfg, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        LLM(cfg.path, kv_cache_memory=KV_BYTES, tensor_parallel_size=3)


def test_a_worker_that_dies_while_starting_is_an_error_not_a_hang(qwen2_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker exits at once
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="rank 1 .* exited with code 1 while starting"):
        LLM(qwen2_path, kv_cache_memory=KV_BYTES, tensor_parallel_size=2)
    assert time.monotonic() - start < 30


# ---- engines that clean up -------------------------------------------------------------------
def test_a_tp_engine_is_released_by_its_with_block_and_by_del(dense_path):
    """One process holds one torch.distributed group at a time: leaving `with LLM(...)`
    or dropping the LLM must free it (workers stopped, group destroyed), so the next
    tensor-parallel LLM can start. shutdown() stays idempotent."""
    import gc

    import torch.distributed as dist

    ref = reference(dense_path, PROMPTS[:2])
    with LLM(dense_path, dtype="float32", kv_cache_memory=KV_BYTES,
             tensor_parallel_size=2) as llm:
        first_worker = llm.engine.tp.workers[0]
        assert_same_generations(llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]],
                                             GREEDY), ref)
    assert first_worker.poll() is not None and not dist.is_initialized()
    llm.shutdown()  # again: nothing to do

    llm = LLM(dense_path, dtype="float32", kv_cache_memory=KV_BYTES, tensor_parallel_size=2)
    worker = llm.engine.tp.workers[0]
    assert_same_generations(llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]],
                                         GREEDY), ref)
    del llm
    gc.collect()
    assert worker.wait(timeout=15) is not None and not dist.is_initialized()
