"""End-to-end engine behaviour on a tiny random Qwen2 (float32)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import reference_model
from yun import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 4000) for _ in range(rng.randint(lo, hi))]}
            for _ in range(n)]


@pytest.fixture(scope="module")
def llm(qwen2_path):
    return LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_batched_requests_match_each_run_alone(llm):
    ps = prompts(8)
    together = tokens(llm.generate(ps, GREEDY))
    alone = [tokens(llm.generate(p, GREEDY))[0] for p in ps]
    assert together == alone


def test_chunked_prefill_matches_unchunked(qwen2_path):
    ps = prompts(6, seed=1, lo=40, hi=120)
    small = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20,
                max_num_batched_tokens=32)  # every prompt is split across steps
    whole = LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20,
                enable_chunked_prefill=False, max_num_batched_tokens=4096)
    assert tokens(small.generate(ps, GREEDY)) == tokens(whole.generate(ps, GREEDY))


def test_preemption_under_a_tiny_kv_budget_loses_nothing(qwen2_path, llm):
    ps = prompts(16, seed=2, lo=20, hi=60)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)
    big = tokens(llm.generate(ps, params))
    # 2 layers x 2 kv heads x 16 dims x 2 (K,V) x 4 bytes = 512 B/token; 24 blocks of 16.
    tiny = LLM(qwen2_path, dtype="float32", kv_cache_memory=24 * 16 * 512, max_model_len=128)
    assert tiny.engine.kv.num_blocks == 24
    outs = tiny.generate(ps, params)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert tokens(outs) == big
    assert tiny.engine.kv.num_free_blocks == 24


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    target = {"prompt_token_ids": list(range(500, 540))}
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=30,
                            ignore_eos=True)
    alone = tokens(llm.generate(target, params))[0]
    others = prompts(5, seed=3)
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=20)] * 2 + [params]
                         + [SamplingParams(temperature=0.5, max_tokens=35)] * 3)
    assert mixed[2].outputs[0].token_ids == alone
    assert tokens(llm.generate(target, params))[0] == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=30,
                                ignore_eos=True)
    assert tokens(llm.generate(target, other_seed))[0] != alone


def test_n_completions_with_a_seed_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, params)[0]
    b = llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, params)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_stop_string_spanning_tokens_cuts_text_and_stops(llm):
    base = llm.generate({"prompt_token_ids": [3707, 11, 1879]}, GREEDY)[0].outputs[0]
    text = base.text
    assert len(text) > 12
    # Pick a stop string that straddles a token boundary inside the generated text.
    pieces = [llm.tokenizer.decode(base.token_ids[:i]) for i in range(len(base.token_ids) + 1)]
    cut = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 4 and
               len(pieces[i]) > len(pieces[i - 1]) and pieces[i].startswith(pieces[i - 1]))
    boundary = len(pieces[cut - 1])
    stop = text[boundary - 2:boundary + 1]
    first = text.find(stop)
    out = llm.generate({"prompt_token_ids": [3707, 11, 1879]},
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                      stop=[stop]))[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(base.token_ids)


def test_min_tokens_blocks_eos_and_stop_token_ids(llm):
    first = llm.generate({"prompt_token_ids": [42, 43]}, GREEDY)[0].outputs[0].token_ids[0]
    stopped = llm.generate({"prompt_token_ids": [42, 43]},
                           SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[first]))
    assert stopped[0].outputs[0].token_ids == [first]
    assert stopped[0].outputs[0].finish_reason == "stop"
    held = llm.generate({"prompt_token_ids": [42, 43]},
                        SamplingParams(temperature=0, max_tokens=10, min_tokens=5,
                                       stop_token_ids=[first]))[0].outputs[0]
    assert len(held.token_ids) >= 5 and first not in held.token_ids[:5]


def test_logprobs_equal_log_softmax_of_reference_logits(llm, qwen2_path):
    ref = reference_model(qwen2_path)
    prompt = list(range(2000, 2030))
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3,
                                      prompt_logprobs=2))[0]
    gen = out.outputs[0].token_ids
    full = prompt + gen
    with torch.no_grad():
        logp = ref(torch.tensor([full])).logits[0].float().log_softmax(-1)
    for i, (tok, entry) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = logp[len(prompt) - 1 + i]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == 1  # greedy picks the top token
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(entry)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        entry = out.prompt_logprobs[j]
        assert entry[prompt[j]].logprob == pytest.approx(logp[j - 1, prompt[j]].item(), abs=1e-4)


def test_abort_frees_blocks_at_once(llm):
    eng = llm.engine
    free = eng.kv.num_free_blocks
    eng.add_request("x", list(range(100, 180)), SamplingParams(max_tokens=50))
    eng.step()
    assert eng.kv.num_free_blocks < free
    assert eng.abort("x")
    assert eng.kv.num_free_blocks == free and not eng.has_unfinished()


def test_too_long_prompt_is_a_clear_error(qwen2_path):
    small = LLM(qwen2_path, dtype="float32", kv_cache_memory=8 * 2**20, max_model_len=64)
    with pytest.raises(ValueError, match="context length is 64"):
        small.generate({"prompt_token_ids": list(range(100, 170))})
    with pytest.raises(ValueError, match=r"plus max_tokens \(60\)"):
        small.generate({"prompt_token_ids": list(range(100, 110))}, SamplingParams(max_tokens=60))
    assert not small.engine.has_unfinished()


def test_text_prompts_and_finish_reasons(llm):
    outs = llm.generate(["Hello, my name is", "The sky is"],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.prompt for o in outs] == ["Hello, my name is", "The sky is"]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello, my name is")
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_chat_renders_the_models_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}],
                   SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.prompt.startswith("<|im_start|>system")
    assert out.prompt.endswith("<|im_start|>assistant\n")


def test_stop_string_on_the_last_allowed_token_reports_stop(llm):
    base = llm.generate({"prompt_token_ids": [3707, 11, 1879]},
                        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    last_piece = llm.tokenizer.decode(base.token_ids[-1:])
    assert last_piece.strip(), "the last token must decode to some text for this test"
    out = llm.generate({"prompt_token_ids": [3707, 11, 1879]},
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                      stop=[last_piece]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == last_piece


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(top_p=float("inf")),
                                 dict(seed=2**64), dict(seed=-1)])
def test_sampling_params_reject_values_the_sampler_cannot_take(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_tiny_temperature_is_greedy(llm):
    p = {"prompt_token_ids": [5, 6, 7]}
    tiny = llm.generate(p, SamplingParams(temperature=1e-300, max_tokens=8, ignore_eos=True))
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert tokens(tiny) == tokens(greedy)
