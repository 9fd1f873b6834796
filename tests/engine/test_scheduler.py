"""The scheduler with hand-made runner outputs: no model, no torch."""

from __future__ import annotations

from yun.engine.kv_cache import KVCacheManager
from yun.engine.request import Request, RequestStatus
from yun.engine.scheduler import RunnerOutput, Scheduler, SchedulerConfig
from yun.sampling_params import SamplingParams

EOS = 7


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, max_len=256, chunked=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, chunked), kv)


def req(rid: str, n_prompt: int, max_tokens: int = 8, **params) -> Request:
    p = SamplingParams(max_tokens=max_tokens, _eos_token_ids=(EOS,), **params)
    return Request(rid, list(range(100, 100 + n_prompt)), p, max_tokens=max_tokens, seed=0)


def step(s: Scheduler, token_for=lambda r: 1):
    out = s.schedule()
    result = RunnerOutput(sampled={x.request.request_id: [token_for(x.request)]
                                   for x in out.scheduled if x.samples})
    s.update(out, result)
    return out


def test_long_prompt_is_chunked_and_mixed_with_decodes():
    s = make(budget=16)
    a, b = req("a", 5), req("b", 40)
    s.add_request(a)
    s.add_request(b)
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 5), ("b", 11)]
    out = step(s)  # a decodes 1 token; b gets the rest of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 15)]
    assert b.num_computed_tokens == 26 and b.output_token_ids == []
    step(s)
    out = step(s)
    assert b.num_computed_tokens == 41 and len(b.output_token_ids) == 2


def test_eos_at_step_three_finishes_and_frees_blocks():
    s = make()
    a = req("a", 6, max_tokens=20)
    s.add_request(a)
    steps = iter([1, 2, EOS])
    for _ in range(3):
        step(s, lambda r: next(steps))
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert a.output_token_ids == [1, 2, EOS]
    assert s.kv.num_free_blocks == 64 and s.num_unfinished == 0


def test_ignore_eos_and_min_tokens_and_length():
    s = make()
    a = req("a", 3, max_tokens=4, ignore_eos=True)
    b = req("b", 3, max_tokens=4, min_tokens=2)
    s.add_request(a)
    s.add_request(b)
    step(s, lambda r: EOS)
    assert not b.is_finished  # below min_tokens
    step(s, lambda r: EOS)
    assert b.status == RequestStatus.FINISHED_STOPPED and len(b.output_token_ids) == 2
    step(s, lambda r: EOS)
    step(s, lambda r: EOS)
    assert a.status == RequestStatus.FINISHED_LENGTH and len(a.output_token_ids) == 4


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_preemption_takes_the_newest_and_it_resumes_with_its_tokens():
    s = make(num_blocks=6, block_size=4, budget=64)
    old, new = req("old", 8, max_tokens=16), req("new", 8, max_tokens=16)
    s.add_request(old)
    s.add_request(new)
    step(s)  # both admitted: 2 blocks each for their 8 prompt tokens
    assert s.kv.num_free_blocks == 2
    out = step(s)  # each needs a third block for token 9: the last 2 free blocks
    assert not out.preempted and s.kv.num_free_blocks == 0
    while not out.preempted:  # at token 13 "old" needs a 4th block: "new" makes room
        out = step(s)
    assert out.preempted == [new]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.block_ids == [] and s.waiting[0] is new
    kept = list(new.output_token_ids)
    while not old.is_finished:
        step(s)
    while not new.is_finished:
        step(s)
    assert new.output_token_ids[:len(kept)] == kept
    assert len(new.output_token_ids) == 16 and s.kv.num_free_blocks == 6


def test_abort_frees_blocks_and_removes_from_queues():
    s = make()
    a, b = req("a", 10), req("b", 10)
    s.add_request(a)
    s.add_request(b)
    step(s)
    s.abort("a")
    s.abort("b")
    assert s.kv.num_free_blocks == 64 and s.num_unfinished == 0
    assert a.status == RequestStatus.FINISHED_ABORTED
