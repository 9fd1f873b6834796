"""KV-cache groups for models where only some layers slide (yun/engine/kv_groups.py):
the sliding layers' blocks outside the window go back while the full layers keep
theirs; tokens still equal transformers' (chunked prefill, decode past the window,
preemption, prefix-cache hits, Qwen3 layer_types), and both pools are whole at the end."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_checkpoint
from tests.helpers import reference_model
from yun import LLM, SamplingParams
from yun.engine.kv_cache import FREED
from yun.engine.kv_groups import HybridKVCacheManager
from yun.engine.request import Request

WINDOW, BLOCK = 20, 8
QWEN2 = dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e4,
             vocab_size=512, eos_token_id=511, bos_token_id=510, num_hidden_layers=4,
             use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
QWEN3 = dict(architecture="Qwen3ForCausalLM", head_dim=32, rope_theta=1e4,
             tie_word_embeddings=False, vocab_size=512, eos_token_id=511, bos_token_id=510,
             num_hidden_layers=4, use_sliding_window=True, sliding_window=12,
             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                          "full_attention"])
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen2_mixed(tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp("qwen2-mixed")), QWEN2)
    return path, reference_model(path)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _want(ref, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        g = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return g[0, len(prompt):].tolist()


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=8),
                   max_tokens=8, seed=0)


def _all_free(kv: HybridKVCacheManager) -> bool:
    return (kv.full.num_free_blocks == kv.full.num_blocks
            and kv.sliding.num_free_blocks == kv.sliding.num_blocks)


# ---- bookkeeping alone --------------------------------------------------------------
def test_allocation_takes_both_groups_or_neither_and_frees_both():
    kv = HybridKVCacheManager(num_blocks=10, num_window_blocks=3, block_size=4, window=6)
    r = _req("a", 14)
    assert not kv.allocate(r, 14)  # 4 blocks: the full group has them, the sliding not
    assert r.block_ids == [] and r.window_block_ids == [] and _all_free(kv)
    assert kv.allocate(r, 10)  # 3 blocks each: the sliding pool is used up
    assert not kv.allocate(r, 14) and len(r.block_ids) == 3  # neither group grew
    r.num_computed_tokens = 10  # the next query (10) sees keys 5..10: block 0 goes
    assert kv.free_outside_window(r) == 1
    assert r.window_block_ids[0] == FREED and len(r.block_ids) == len(r.window_block_ids) == 3
    assert kv.full.num_live_blocks(r) == 3 and kv.sliding.num_live_blocks(r) == 2
    assert kv.allocate(r, 4)  # positions 10..13: tables of 4 entries in both groups
    assert len(r.block_ids) == len(r.window_block_ids) == 4
    r.num_computed_tokens = 9  # a speculative rollback: blocks past position 9 go back
    kv.free_tail(r)
    assert len(r.block_ids) == len(r.window_block_ids) == 3
    kv.free_request(r)
    assert r.block_ids == [] and r.window_block_ids == [] and _all_free(kv)


def test_a_prefix_hit_needs_the_sliding_blocks_of_the_window_before_it():
    kv = HybridKVCacheManager(num_blocks=20, num_window_blocks=20, block_size=4, window=6)
    a = _req("a", 17)
    assert kv.allocate(a, 17)
    a.num_computed_tokens = 17
    kv.cache_full_blocks(a)  # 4 full blocks named in both groups
    kv.free_outside_window(a)
    kv.free_request(a)
    b = _req("b", 17)  # same tokens: 4 blocks hit; the query at 16 sees keys 11..16
    hits = kv.find_cached_prefix(b)
    assert [s for _, s in hits] == [FREED, FREED] + [kv.sliding.cached[h]
                                                     for h in kv.full._hashes(b)[2:4]]
    kv.sliding._evict(hits[3][1])  # the sliding copy of block 3 is gone:
    kv.sliding.free.move_to_end(hits[3][1], last=False)
    hits = kv.find_cached_prefix(b)  # 3 blocks remain usable (keys 7..11 are blocks 1, 2)
    assert len(hits) == 3 and hits[0][1] == FREED and FREED not in [s for _, s in hits[1:]]
    assert kv.allocate(b, 17 - 12, hits)
    assert kv.sliding.num_live_blocks(b) == 2 + 2 and len(b.window_block_ids) == 5
    kv.free_request(b)
    assert _all_free(kv)


# ---- through the engine -------------------------------------------------------------
def test_mixed_model_frees_sliding_blocks_and_matches_transformers(qwen2_mixed):
    path, ref = qwen2_mixed
    llm = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK,
              max_num_batched_tokens=16, max_num_seqs=4)
    eng, runner = llm.engine, llm.engine.runner
    kv = eng.kv
    assert isinstance(kv, HybridKVCacheManager) and kv.window == WINDOW
    assert runner.sliding_layers == (2, 3)
    assert [c.shape[1] for c in runner.kv_caches] == [kv.full.num_blocks] * 2 + \
        [kv.sliding.num_blocks] * 2
    assert kv.sliding.num_blocks == 4 * (3 + 2) + 2  # the bound, below an even split
    # The rest to the full layers: one layer's token is 2 x 2 KV heads x 16 x 4 bytes.
    assert kv.full.num_blocks == (2**20 // (256 * BLOCK) - 2 * kv.sliding.num_blocks) // 2
    assert "two groups" in runner.describe_kv_cache()
    prompt = _ids(45, 2)
    eng.add_request("long", prompt, GREEDY)
    bound = -(-WINDOW // BLOCK) + 1
    most, full_most, tokens = 0, 0, []
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
        req = eng.scheduler.requests.get("long")
        if req is not None:
            live = kv.sliding.num_live_blocks(req)
            assert live <= bound
            assert kv.full.num_live_blocks(req) == -(-req.num_computed_tokens // BLOCK)
            assert len(req.window_block_ids) == len(req.block_ids)
            most, full_most = max(most, live), max(full_most, kv.full.num_live_blocks(req))
    assert most == bound and full_most == -(-(45 + 39) // BLOCK)  # 11 blocks kept in full
    assert tokens == _want(ref, prompt, 40)
    assert _all_free(kv)


def test_batch_with_preemption_matches_transformers_and_frees_both(qwen2_mixed):
    path, ref = qwen2_mixed
    probe = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK)
    layer_block = probe.engine.runner.kv_bytes_per_token() // 4 * BLOCK
    # max_num_seqs 2, 16 tokens a step: the sliding pool needs 2 * (3 + 2) + 2 = 12
    # blocks; an even split of 48 layer-blocks gives 12 to each group: 96 tokens of full.
    llm = LLM(path, dtype="float32", kv_cache_memory=48 * layer_block, block_size=BLOCK,
              max_num_batched_tokens=16, max_num_seqs=2)
    kv = llm.engine.kv
    assert (kv.full.num_blocks, kv.sliding.num_blocks) == (12, 12)
    prompts = [_ids(40, 7), _ids(36, 8)]  # 80 + 76 tokens: 20 blocks of 12 in full
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _want(ref, p, 40)
    assert _all_free(kv)


def test_abort_releases_both_groups(qwen2_mixed):
    path, _ = qwen2_mixed
    llm = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK,
              max_num_batched_tokens=16)
    eng = llm.engine
    eng.add_request("a", _ids(50, 3), GREEDY)
    for _ in range(6):  # prefill in 16-token chunks, then decodes past the window
        eng.step()
    req = eng.scheduler.requests["a"]
    assert FREED in req.window_block_ids and eng.kv.sliding.num_live_blocks(req) > 0
    assert eng.abort("a")
    assert _all_free(eng.kv) and not eng.has_unfinished()


def test_prefix_cache_hit_on_a_mixed_model_gives_the_same_tokens(qwen2_mixed):
    path, ref = qwen2_mixed
    on = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK)
    prefix = _ids(50, 11)
    a, b = prefix + _ids(5, 12), prefix + _ids(9, 13)
    first = on.generate({"prompt_token_ids": a}, GREEDY)[0]
    second = on.generate({"prompt_token_ids": b}, GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 48  # 6 blocks
    assert second.outputs[0].token_ids == _want(ref, b, 40)
    assert first.outputs[0].token_ids == _want(ref, a, 40)
    assert _all_free(on.engine.kv)


def test_qwen3_layer_types_greedy_batch_matches_transformers(tmp_path):
    path = build_checkpoint(str(tmp_path), QWEN3)
    ref = reference_model(path)
    llm = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK,
              max_num_batched_tokens=24)
    assert llm.engine.runner.sliding_layers == (0, 2) and llm.engine.kv.window == 12
    prompts = [_ids(n, n) for n in (9, 30, 41)]  # shorter and longer than the window
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _want(ref, p, 40)
    assert _all_free(llm.engine.kv)


def test_int8_cache_and_ngram_speculation_work_per_group(qwen2_mixed):
    path, ref = qwen2_mixed
    llm = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK,
              kv_cache_dtype="int8", max_num_batched_tokens=16)
    kv, caches = llm.engine.kv, llm.engine.runner.kv_caches
    assert all(c.dtype == torch.int8 for c in caches)
    assert caches[3].shape[1] == kv.sliding.num_blocks < caches[0].shape[1]
    out = llm.generate({"prompt_token_ids": _ids(45, 2)}, GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 40 and _all_free(kv)
    spec = LLM(path, dtype="float32", kv_cache_memory=2**20, block_size=BLOCK,
               max_num_batched_tokens=16, speculative_method="ngram",
               num_speculative_tokens=3)
    prompt = _ids(12, 4) * 4  # repeats: the n-gram proposer has something to guess
    out = spec.generate({"prompt_token_ids": prompt}, GREEDY)[0]
    assert out.outputs[0].token_ids == _want(ref, prompt, 40)
    assert _all_free(spec.engine.kv)


def test_a_mixed_draft_model_is_refused(tmp_path):
    arch = {k: v for k, v in QWEN2.items()
            if k not in ("vocab_size", "eos_token_id", "bos_token_id")}  # the tokenizer's
    path = build_checkpoint(str(tmp_path / "draft"), arch)
    target = build_checkpoint(str(tmp_path / "target"), {**arch, "use_sliding_window": False})
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention"):
        LLM(target, dtype="float32", kv_cache_memory=2**20, speculative_method="draft",
            speculative_model=path, num_speculative_tokens=2)
