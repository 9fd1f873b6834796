"""Speculative decoding on the real default model (SmolLM2-135M-Instruct Q4_1): greedy
output with n-gram proposals is the output without them, token for token, on chat
prompts that copy text (many proposals accepted) and ones that do not."""

from __future__ import annotations

import pytest

from yun import LLM, SamplingParams

TEXT = ("The scheduler picks the requests that compute tokens in each step. A long prompt "
        "is split into chunks, so that short requests keep flowing. The key and value "
        "vectors of every token are stored in blocks of sixteen.")
CHATS = [
    [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}],
    [{"role": "user", "content": "Rewrite the text, replacing 'tokens' with 'pieces':\n\n"
                                 + TEXT}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List the numbers from 1 to 30, separated by commas."}],
]


@pytest.fixture(scope="module")
def engines(smollm2):
    kw = dict(kv_cache_memory=64 * 2**20, max_model_len=1024)  # threads: the CPUs it may use
    return LLM(smollm2, **kw), LLM(smollm2, speculative_method="ngram", **kw)


def test_greedy_chat_output_is_identical_with_ngram_speculation(engines):
    plain, spec = engines
    params = SamplingParams(temperature=0, max_tokens=64)
    want = [o.outputs[0].token_ids for o in plain.chat(CHATS, params)]
    got = [o.outputs[0].token_ids for o in spec.chat(CHATS, params)]
    assert got == want
    stats = spec.engine.speculator.stats
    assert stats.num_accepted > 20  # the copying prompts accept runs of proposals
    assert spec.engine.kv.num_free_blocks == spec.engine.kv.num_blocks
    one = [o.outputs[0].token_ids for o in spec.chat(CHATS[:1], params)]
    assert one == want[:1]  # alone, at batch 1 (more proposals per step)
