"""The block allocator and prefix cache, without a model."""

from __future__ import annotations

from yun.engine.kv_cache import KVCacheManager
from yun.engine.request import Request
from yun.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), max_tokens=16, seed=0)


def test_allocation_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("a", list(range(10)))
    assert kv.allocate(r, 10)
    assert len(r.block_ids) == 3 and kv.num_free_blocks == 5
    r.num_computed_tokens = 10
    assert kv.allocate(r, 2)  # tokens 10, 11 fit in block 3
    assert len(r.block_ids) == 3
    kv.free_request(r)
    assert kv.num_free_blocks == 8 and r.block_ids == []


def test_allocation_fails_without_side_effects_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = req("a", list(range(12)))
    assert not kv.allocate(r, 12)
    assert r.block_ids == [] and kv.num_free_blocks == 2


def test_shared_prefix_reuses_full_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = req("a", list(range(12)))
    kv.allocate(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    b = req("b", list(range(10)) + [99, 98])
    hits = kv.find_cached_prefix(b)
    assert hits == a.block_ids[:2]  # tokens 0..7; block 3 differs at token 10
    c = req("c", list(range(12)))  # identical prompt: last block recomputed
    assert kv.find_cached_prefix(c) == a.block_ids[:2]
    assert kv.allocate(b, 4, hits)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert kv.ref_counts[a.block_ids[0]] == 2


def test_freed_cached_blocks_are_reused_until_evicted_and_never_stale():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req("a", list(range(8)))
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    kv.free_request(a)
    assert kv.num_free_blocks == 4
    again = req("a2", list(range(8)) + [1])
    assert len(kv.find_cached_prefix(again)) == 2
    # Fill the whole cache with other tokens: the cached blocks get evicted.
    other = req("o", list(range(100, 116)))
    assert kv.allocate(other, 16)
    assert kv.find_cached_prefix(again) == []
    kv.free_request(other)


def test_prompt_logprob_requests_bypass_the_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(9)))
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    assert kv.find_cached_prefix(req("b", list(range(9)))) != []
    assert kv.find_cached_prefix(req("c", list(range(9)), prompt_logprobs=1)) == []


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req("a", list(range(9)))
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    assert kv.find_cached_prefix(req("b", list(range(9)))) == []
