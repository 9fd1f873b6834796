"""Tensor parallelism over a quantized GGUF file: each rank keeps its slice of the Q8_0
blocks (rows for the column-parallel projections, whole blocks of each row for the
row-parallel ones) and the two ranks give the same greedy tokens and logprobs as one
process (2 CPU ranks, gloo; one worker process)."""

from __future__ import annotations

import math

import pytest

from tests.gguf.test_gguf_parity import prompts
from yun import LLM, SamplingParams

KV_BYTES = 8 * 2**20
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster and steadier than two on a shared machine."""


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_tp2_over_q8_0_blocks_gives_the_same_tokens_as_one_process(gguf_models, native):
    path = gguf_models.gguf("llama", "Q8_0")  # hidden 256, 4 heads of 64, FFN 512
    batch = [{"prompt_token_ids": p} for p in prompts("llama")]
    with LLM(path, dtype="float32", kv_cache_memory=KV_BYTES, num_threads=1,
             native_kernels=native) as one:
        ref = one.generate(batch, GREEDY)
    with LLM(path, dtype="float32", kv_cache_memory=KV_BYTES, native_kernels=native,
             tensor_parallel_size=2) as two:
        o_proj = two.engine.runner.model.model.layers[0].self_attn.o_proj
        assert type(o_proj).__name__ == "QuantLinear"  # cut along whole blocks, still Q8_0
        assert o_proj.in_features == 128
        ours = two.generate(batch, GREEDY)
    tol = 1e-4 if not native else 2e-3  # native: activations rounded per rank's K slice
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for tok, la, lb in zip(b.outputs[0].token_ids, a.outputs[0].logprobs,
                               b.outputs[0].logprobs):
            assert math.isclose(la[tok].logprob, lb[tok].logprob, abs_tol=tol)
