"""Automatic prefix caching through the whole engine."""

from __future__ import annotations

import random

from yun import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def shared_prefix_prompts(n: int, prefix_len: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 4000) for _ in range(prefix_len)]
    return [{"prompt_token_ids": prefix + [rng.randrange(100, 4000)
                                           for _ in range(rng.randint(1, 20))]}
            for _ in range(n)]


def run(llm: LLM, ps, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(ps, params)]


def test_outputs_identical_with_and_without_prefix_caching(qwen2_path):
    ps = shared_prefix_prompts(10, 70, seed=0)
    on = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20)
    off = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20,
              enable_prefix_caching=False)
    first = run(on, ps[:1])
    rest = run(on, ps[1:])  # these hit the cached prefix
    stats = on.engine.kv.stats()
    assert stats.prefix_hits >= 9 * 64  # 4 full blocks of the 70-token prefix, 9 requests
    assert first + rest == run(off, ps)
    assert off.engine.kv.stats().prefix_hits == 0


def test_cached_requests_report_cached_tokens(qwen2_path):
    llm = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20)
    ps = shared_prefix_prompts(2, 40, seed=1)
    a = llm.generate(ps[0], GREEDY)[0]
    b = llm.generate(ps[1], GREEDY)[0]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 32


def test_eviction_under_memory_pressure_never_serves_stale_blocks(qwen2_path):
    # 20 blocks of 16 tokens: every new batch evicts what earlier ones cached.
    small = LLM(qwen2_path, dtype="float32", kv_cache_memory=20 * 16 * 512, max_model_len=128)
    big = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20,
              enable_prefix_caching=False)
    rounds = [shared_prefix_prompts(4, 40, seed=s) for s in range(4)]
    rounds.append(rounds[0])  # come back to the first prefix after it was evicted
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=10, ignore_eos=True)
    for ps in rounds:
        assert run(small, ps, params) == run(big, ps, params)
    assert small.engine.kv.num_free_blocks == 20


def test_prompt_logprobs_bypass_cache_and_stay_complete(qwen2_path):
    llm = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20)
    ps = shared_prefix_prompts(2, 48, seed=2)
    llm.generate(ps[0], GREEDY)
    out = llm.generate(ps[1], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(ps[1]["prompt_token_ids"])
    assert out.prompt_logprobs[0] is None and all(e is not None for e in out.prompt_logprobs[1:])
