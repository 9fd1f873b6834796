"""Speculative decoding: n-gram proposals verified in one pass, on a tiny random Qwen2
(float32). Proposals also come from an "oracle" that knows the non-speculative output and
corrupts some of it, so that long accepted runs and rejections at every position happen."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from yun import LLM, SamplingParams
from yun.engine.kv_cache import KVCacheManager
from yun.engine.request import Request
from yun.engine.scheduler import RunnerOutput, Scheduler, SchedulerConfig
from yun.engine.spec.controller import SpecController
from yun.engine.spec.ngram import NgramProposer
from yun.engine.spec.speculator import Speculator
from yun.engine.spec.verify import accepted_prefix
from yun.sampling_params import GuidedDecoding

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


class OracleProposer:
    """Proposes the reference continuation (from a run without speculation), each token
    replaced by a wrong one with probability `error`."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], error: float, seed=0):
        self.reference, self.error = reference, error
        self.rng = random.Random(seed)

    def propose(self, req: Request, k: int) -> list[int]:
        ref = self.reference.get(tuple(req.prompt_token_ids))
        if ref is None:
            return []
        done = req.num_output_tokens
        out = list(ref[done:done + k])
        return [t if self.rng.random() >= self.error else (t + 1) % 1000 + 5 for t in out]

    def release(self, request_id: str) -> None:
        pass


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 4000) for _ in range(rng.randint(5, 60))] for _ in range(n)]


def repetitive(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase, so the n-gram proposer finds matches."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(100, 4000) for _ in range(rng.randint(6, 12))]
        out.append(phrase * rng.randint(3, 5))
    return out


def make(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=16 * 2**20, **kw)


def tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


@pytest.fixture(scope="module")
def plain(qwen2_path):
    return make(qwen2_path)


@pytest.fixture(scope="module")
def spec(qwen2_path):
    return make(qwen2_path, speculative_method="ngram", num_speculative_tokens=4)


def use_oracle(llm: LLM, reference, error: float, k: int = 4) -> None:
    llm.engine.speculator = Speculator(OracleProposer(reference, error), k, adaptive=False)


def reference_of(ps, outs) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): o.outputs[0].token_ids for p, o in zip(ps, outs)}


# ---- pieces -------------------------------------------------------------------------------
def test_accepted_prefix_stops_at_the_first_mismatch():
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accepted_prefix([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accepted_prefix([5, 6, 7], [1, 6, 7, 8]) == [1]


def test_ngram_proposes_the_continuation_of_the_latest_match():
    p = NgramProposer(min_n=2, max_n=3)
    r = Request("a", [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2], SamplingParams(), 10, 0)
    assert p.propose(r, 3) == [3, 5, 6]  # "1 2" last seen before "3 5 6"
    r.output_token_ids += [3]
    assert p.propose(r, 2) == [5, 6]  # "1 2 3": the longest match wins
    r.output_token_ids += [8]  # "3 8" never seen
    assert p.propose(r, 4) == []


def test_controller_switches_off_when_tokens_cost_as_much_as_steps():
    c = SpecController(max_proposals=5)
    for i in range(40):  # batch-1-like: a step costs 20 ms plus 1 ms per token
        t = 1 + i % 6
        c.observe_step(t, 0.020 + 0.001 * t)
    c.observe_verification("r", 5, 5)
    assert c.num_proposals("r", num_decoding=1, step_tokens=1) == 5
    assert c.num_proposals("r", num_decoding=64, step_tokens=64) < 5
    for i in range(40):  # token-bound: 1 ms per token, no per-step overhead
        t = 32 + i
        c.observe_step(t, 0.001 * t)
    assert c.num_proposals("new", num_decoding=64, step_tokens=64) == 0
    for _ in range(10):
        c.observe_verification("bad", 4, 0)
    for i in range(40):
        t = 1 + i % 6
        c.observe_step(t, 0.020 + 0.001 * t)
    assert c.num_proposals("bad", num_decoding=1, step_tokens=1) == 0


# ---- exactness ----------------------------------------------------------------------------
def test_ngram_greedy_output_is_token_identical_batched_with_others(plain, spec):
    ps = repetitive(5) + prompts(3)
    params = [GREEDY] * 5 + [SamplingParams(temperature=0.8, seed=3, max_tokens=30)] * 3
    batch = [{"prompt_token_ids": p} for p in ps]
    want = tokens(plain.generate(batch, params))
    got = tokens(spec.generate(batch, params))
    assert got == want
    stats = spec.engine.speculator.stats
    assert stats.num_proposed > 0 and stats.num_accepted > 0


@pytest.mark.parametrize("error", [0.0, 0.3])
def test_oracle_proposals_verify_to_the_same_greedy_tokens(qwen2_path, plain, error):
    ps = prompts(6, seed=1)
    batch = [{"prompt_token_ids": p} for p in ps]
    ref = plain.generate(batch, GREEDY)
    llm = make(qwen2_path)
    use_oracle(llm, reference_of(ps, ref), error)
    assert tokens(llm.generate(batch, GREEDY)) == tokens(ref)
    stats = llm.engine.speculator.stats
    assert stats.num_accepted > 0
    if error == 0.0:  # all accepted: ~5 tokens per step
        assert stats.num_accepted == stats.num_proposed
    else:
        assert 0 < stats.num_accepted < stats.num_proposed
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_seeded_sampling_gives_the_same_tokens_with_speculation(qwen2_path, plain):
    """The noise belongs to the output position: on or off, the same seeded tokens."""
    ps = prompts(4, seed=2)
    batch = [{"prompt_token_ids": p} for p in ps]
    params = [SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=11 + i,
                             max_tokens=30, ignore_eos=True) for i in range(4)]
    ref = plain.generate(batch, params)
    llm = make(qwen2_path)
    use_oracle(llm, reference_of(ps, ref), error=0.3)
    assert tokens(llm.generate(batch, params)) == tokens(ref)
    assert llm.engine.speculator.stats.num_accepted > 0


def test_penalties_logprobs_min_tokens_and_stops_match_without_speculation(qwen2_path, plain):
    ps = prompts(3, seed=4)
    batch = [{"prompt_token_ids": p} for p in ps]
    base = plain.generate(batch[:1], GREEDY)[0].outputs[0].token_ids
    stop_tok = base[7]
    params = [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.5,
                             presence_penalty=0.5, frequency_penalty=0.3, logprobs=2,
                             ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, min_tokens=3,
                             stop_token_ids=[stop_tok]),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)]
    params[1] = SamplingParams(temperature=0, max_tokens=30, min_tokens=3,
                               stop_token_ids=[stop_tok])
    batch[1] = batch[0]
    ref = plain.generate(batch, params)
    llm = make(qwen2_path)
    reference = {tuple(p["prompt_token_ids"]): plain.generate(p, GREEDY)[0].outputs[0].token_ids
                 for p in batch}
    use_oracle(llm, reference, error=0.2)
    got = llm.generate(batch, params)
    assert tokens(got) == tokens(ref)
    assert [c.finish_reason for o in got for c in o.outputs] == \
        [c.finish_reason for o in ref for c in o.outputs]
    assert len(got[2].outputs[0].token_ids) == 13  # max_tokens never overshot
    for a, b in zip(got[0].outputs[0].logprobs, ref[0].outputs[0].logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


def test_stop_string_inside_a_speculative_step_cuts_the_tokens(qwen2_path, plain):
    p = {"prompt_token_ids": [3707, 11, 1879]}
    base = plain.generate(p, GREEDY)[0].outputs[0]
    stop = base.text[len(base.text) // 2:len(base.text) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    ref = plain.generate(p, params)[0].outputs[0]
    llm = make(qwen2_path)
    use_oracle(llm, {tuple(p["prompt_token_ids"]): base.token_ids}, error=0.0, k=6)
    got = llm.generate(p, params)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == \
        (ref.text, ref.token_ids, ref.finish_reason)


def test_n_completions_and_prefix_caching_with_speculation(plain, spec):
    p = {"prompt_token_ids": repetitive(1, seed=5)[0]}
    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=25, ignore_eos=True)
    want = tokens(plain.generate(p, params))
    assert tokens(spec.generate(p, params)) == want
    assert tokens(spec.generate(p, params)) == want  # the prompt now comes from the cache
    assert spec.engine.kv.num_free_blocks == spec.engine.kv.num_blocks


# ---- KV accounting and preemption ---------------------------------------------------------
def test_rejected_proposals_give_their_blocks_back():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(4, 64, 256), kv)
    r = Request("a", list(range(10, 17)), SamplingParams(max_tokens=30, ignore_eos=True),
                max_tokens=30, seed=0)
    s.add_request(r)
    out = s.schedule()  # 7 prompt tokens: 2 blocks
    s.update(out, RunnerOutput(sampled={"a": [1]}))
    r.draft_token_ids = [2, 3, 4, 5, 6, 7]
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 7 and len(r.block_ids) == 4  # 14 positions
    s.update(out, RunnerOutput(sampled={"a": [2, 9]}))  # one accepted, then a new token
    assert r.output_token_ids == [1, 2, 9] and r.num_computed_tokens == 9
    assert len(r.block_ids) == 3 and kv.num_free_blocks == 13  # positions 0-9 kept
    r.draft_token_ids = [5] * 10
    out = s.schedule()  # max_tokens 30: 3 done, so at most 26 proposals; all 10 fit
    assert out.scheduled[0].draft_token_ids == [5] * 10
    s.update(out, RunnerOutput(sampled={"a": [5] * 11}))
    assert r.num_output_tokens == 14 and r.num_computed_tokens == 20
    while not r.is_finished:
        r.draft_token_ids = [5] * 8
        out = s.schedule()
        k = len(out.scheduled[0].draft_token_ids)
        s.update(out, RunnerOutput(sampled={"a": [5] * (k + 1)}))
    assert r.num_output_tokens == 30  # never past max_tokens
    assert kv.num_free_blocks == 16


def test_preemption_in_the_middle_of_speculative_steps_loses_nothing(qwen2_path, plain):
    ps = prompts(12, seed=6)
    batch = [{"prompt_token_ids": p} for p in ps]
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)
    ref = plain.generate(batch, params)
    tiny = LLM(qwen2_path, dtype="float32", kv_cache_memory=24 * 16 * 512, max_model_len=128)
    use_oracle(tiny, reference_of(ps, ref), error=0.25, k=5)
    got = tiny.generate(batch, params)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert tiny.engine.speculator.stats.num_accepted > 0
    assert tokens(got) == tokens(ref)
    assert tiny.engine.kv.num_free_blocks == tiny.engine.kv.num_blocks


# ---- grammar ------------------------------------------------------------------------------
def test_grammar_masks_apply_at_every_verified_position(qwen2_path, plain):
    guided = GuidedDecoding(regex=r"(ab|cd|ef){3,12}")
    p = {"prompt_token_ids": [3707, 11, 1246]}
    params = [SamplingParams(temperature=t, seed=s, max_tokens=40, guided=guided)
              for t, s in ((0, 0), (1.0, 1), (1.0, 2))]
    ref = plain.generate([p] * 3, params)
    llm = make(qwen2_path)
    reference = {tuple(p["prompt_token_ids"]): ref[0].outputs[0].token_ids}
    use_oracle(llm, reference, error=0.3, k=4)
    got = llm.generate([p] * 3, params)
    assert tokens(got) == tokens(ref)
    assert llm.engine.speculator.stats.num_accepted > 0
    import re
    for o in got:
        assert re.fullmatch(r"(ab|cd|ef){3,12}", o.outputs[0].text), o.outputs[0].text


# ---- rejection sampling, statistically ----------------------------------------------------
def _verify_many(p_rows: list[list[float]], draft: list[int], trials: int) -> list[list[int]]:
    """Run the verification of `draft` against fixed target distributions (row j = the
    target at position j) for `trials` differently seeded requests."""
    from yun.engine.sampler import Sampler, SamplingRow
    from yun.engine.spec.verify import seed_for_position

    params = SamplingParams(temperature=1.0)
    logits = torch.tensor(p_rows).log()  # [k+1, V]
    rows, idx = [], []
    for t in range(trials):
        for j in range(len(p_rows)):
            g = torch.Generator().manual_seed(seed_for_position(1000 + t, j))
            rows.append(SamplingRow(params, g, [1], list(draft[:j])))
    sampled, _ = Sampler()(logits.repeat(trials, 1), rows)
    k1 = len(p_rows)
    return [accepted_prefix(draft, sampled[t * k1:(t + 1) * k1]) for t in range(trials)]


def test_rejection_sampling_keeps_the_target_distribution():
    from scipy.stats import chisquare

    p0 = [0.05, 0.4, 0.25, 0.1, 0.2]  # target at the first position; the draft proposes 3
    p1 = [0.3, 0.1, 0.1, 0.2, 0.3]  # target at the second position; the draft proposes 0
    trials = 4000
    outs = _verify_many([p0, p1, [0.2] * 5], [3, 0], trials)
    first = np.bincount([o[0] for o in outs], minlength=5)
    assert chisquare(first, np.array(p0) * trials).pvalue > 1e-3
    accepted = sum(o[0] == 3 for o in outs)  # accepted with probability p0[3] = min(1, p/q)
    assert abs(accepted / trials - p0[3]) < 4 * (p0[3] * (1 - p0[3]) / trials) ** 0.5
    # A rejected draft: the token is drawn from the residual, p0 without token 3.
    rejected = np.bincount([o[0] for o in outs if o[0] != 3], minlength=5)
    residual = np.array(p0) * (np.arange(5) != 3)
    residual = residual / residual.sum() * rejected.sum()
    keep = residual > 0
    assert chisquare(rejected[keep], residual[keep]).pvalue > 1e-3
    # After an accepted first draft, the second token follows p1 (whether it is 0 or not).
    second = np.bincount([o[1] for o in outs if len(o) > 1], minlength=5)
    assert chisquare(second, np.array(p1) * second.sum()).pvalue > 1e-3
    assert all(len(o) == 3 for o in outs if o[:2] == [3, 0])  # both accepted: a bonus token


def test_metrics_report_acceptance_per_position():
    from prometheus_client import CollectorRegistry, generate_latest

    from yun.engine.async_engine import EngineStats
    from yun.server.metrics import _SpecCollector

    registry = CollectorRegistry()
    registry.register(_SpecCollector(EngineStats(spec_proposed=[10, 8], spec_accepted=[6, 2],
                                                 spec_proposer_seconds=1.5,
                                                 spec_proposer_steps=3)))
    text = generate_latest(registry).decode()
    assert "yun_spec_decode_proposer_seconds_total 1.5" in text
    assert "yun_spec_decode_proposer_steps_total 3.0" in text
    assert "yun_spec_decode_num_draft_tokens_total 18.0" in text
    assert "yun_spec_decode_num_accepted_tokens_total 8.0" in text
    assert 'yun_spec_decode_acceptance_rate_per_pos{position="0"} 0.6' in text
    assert 'yun_spec_decode_acceptance_rate_per_pos{position="1"} 0.25' in text
    empty = CollectorRegistry()
    empty.register(_SpecCollector(EngineStats()))
    assert "yun_spec" not in generate_latest(empty).decode()  # speculation off: no series
