"""Blocks outside a sliding window go back (yun/engine/kv_cache.py): on a model whose
every layer slides, a sequence longer than the window holds at most ceil(W / block) + 1
blocks, its tokens still equal transformers', and every block is free at the end; a
model where only some layers slide keeps them all in its full-attention group (its
sliding group frees them: tests/engine/test_hybrid_window.py)."""

from __future__ import annotations

import torch

from tests.conftest import build_checkpoint
from tests.helpers import reference_model
from yun import LLM, SamplingParams
from yun.engine.kv_cache import FREED, KVCacheManager
from yun.engine.request import Request

WINDOW, BLOCK = 20, 16
TINY = dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e4,
            vocab_size=512, eos_token_id=511, bos_token_id=510, use_sliding_window=True,
            sliding_window=WINDOW)


def _req(n: int) -> Request:
    return Request("a", list(range(n)), SamplingParams(max_tokens=8), max_tokens=8, seed=0)


def test_blocks_before_the_next_window_are_freed_and_marked():
    kv = KVCacheManager(num_blocks=10, block_size=4, sliding_window=6)
    r = _req(14)
    assert kv.allocate(r, 14)
    r.num_computed_tokens = 14  # the next query (position 14) sees keys 9..14
    assert kv.free_outside_window(r) == 2  # blocks 0 (keys 0-3) and 1 (4-7)
    assert r.block_ids[:2] == [FREED, FREED] and FREED not in r.block_ids[2:]
    assert kv.num_live_blocks(r) == 2 and kv.num_free_blocks == 8
    assert kv.free_outside_window(r) == 0  # nothing more until the window moves
    assert kv.allocate(r, 4)  # positions 14..17: a fifth block, the table keeps its indices
    assert len(r.block_ids) == 5
    kv.free_request(r)
    assert kv.num_free_blocks == 10 and r.block_ids == []
    assert KVCacheManager(4, 4).free_outside_window(_req(14)) == 0  # no window: keep all


def test_all_sliding_model_keeps_a_window_of_blocks_and_matches_transformers(tmp_path):
    path = build_checkpoint(str(tmp_path), {**TINY, "max_window_layers": 0})
    llm = LLM(path, dtype="float32", kv_cache_memory=2**20, max_num_batched_tokens=16)
    eng = llm.engine
    assert eng.kv.sliding_window == WINDOW
    prompt = torch.randint(0, 500, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    eng.add_request("long", prompt, params)
    bound = -(-WINDOW // BLOCK) + 1
    most, tokens = 0, []
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
        req = eng.scheduler.requests.get("long")
        if req is not None:
            most = max(most, eng.kv.num_live_blocks(req))
            assert eng.kv.num_blocks - eng.kv.num_free_blocks <= bound
    assert most == bound  # 105 tokens: 7 blocks without freeing
    with torch.no_grad():
        want = reference_model(path).generate(torch.tensor([prompt]), max_new_tokens=60,
                                              do_sample=False)[0, len(prompt):].tolist()
    assert tokens == want
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_a_model_with_full_attention_layers_keeps_every_block_in_its_full_group(tmp_path):
    path = build_checkpoint(str(tmp_path), {**TINY, "max_window_layers": 1})
    llm = LLM(path, dtype="float32", kv_cache_memory=2**20)
    kv = llm.engine.kv
    assert kv.sliding_window is None and kv.full.sliding_window is None
    assert kv.sliding.sliding_window == WINDOW
