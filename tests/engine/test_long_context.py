"""Long prompts against a small KV cache: they wait or preempt, never crash, lose nothing."""

from __future__ import annotations

import random

from yun import LLM, SamplingParams

PER_TOKEN = 512  # tiny Qwen2: 2 layers x 2 kv heads x 16 dims x (K, V) x 4 bytes


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 4000) for _ in range(n)]


def test_prompt_that_fits_the_model_but_not_the_free_cache_waits_and_matches(qwen2_path):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    short = [_ids(30, s) for s in range(3)]
    long = _ids(110, 9)
    roomy = LLM(qwen2_path, dtype="float32", kv_cache_memory=8 * 2**20)
    want = [o.outputs[0].token_ids
            for o in roomy.generate([{"prompt_token_ids": p} for p in [*short, long]], params)]
    # 8 blocks of 16 = 128 tokens: the 122-token request needs nearly all of them.
    tiny = LLM(qwen2_path, dtype="float32", kv_cache_memory=8 * 16 * PER_TOKEN,
               max_model_len=128, max_num_batched_tokens=32)
    eng = tiny.engine
    assert eng.kv.num_blocks == 8
    for i, p in enumerate(short):
        eng.add_request(f"s{i}", p, params)
    eng.step()
    eng.add_request("long", long, params)
    got: dict[str, list[int]] = {}
    waited = False
    for _ in range(500):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        waited |= any(r.request_id == "long" for r in eng.scheduler.waiting)
    assert [got[f"s{i}"] for i in range(3)] + [got["long"]] == want
    assert waited or eng.scheduler.num_preemptions > 0  # it did not fit at once
    assert eng.kv.num_free_blocks == 8 and not eng.has_unfinished()
