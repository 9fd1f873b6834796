"""Every block type yun reads, on tiny models where it covers every matrix: hidden 256
and FFN 512 are multiples of the K-quants' 256-value super-blocks, so `llama-quantize
--pure` gives each 2-D tensor (embedding and output included) the one type. The real
SmolLM2 file (hidden 576) cannot hold K-quants in most tensors, and Q2_K in none: see
test_quantized_quality.py for real-text quality.

Exact path (native_kernels=False): logits within 1e-4 of the HF model holding the file's
numbers (reference.rounded_reference: bit-exact rounding check for Q4_0..Q5_1, error-size
check for K-quants), and the same greedy tokens. Native kernels (the default): within
test_gguf_parity.assert_native_close's bound (activations are rounded the same way
whatever the weight type)."""

from __future__ import annotations

import pytest
import torch

from tests.gguf.reference import read_gguf, rounded_reference
from tests.gguf.test_gguf_parity import (LOGIT_TOL, assert_native_close, make_llm,
                                         ref_greedy, vocab_of, yun_greedy)
from tests.helpers import logits_in_chunks

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CASES = [("llama", t) for t in BLOCK_TYPES] + [("qwen3moe", "Q5_0"), ("qwen3moe", "Q4_K")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster and steadier than two on a shared machine."""


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, gguf_models):
    kind, qtype = request.param
    path = gguf_models.pure(kind, qtype)
    ref = rounded_reference(gguf_models.hf_dir(kind), path)
    ids = torch.randint(3, vocab_of(kind) - 300, (70,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    return kind, qtype, path, ref, ids, expected


def test_every_matrix_has_the_type(case):
    kind, qtype, path, *_ = case
    from gguf import GGMLQuantizationType

    types = {GGMLQuantizationType(t.qtype).name for t in read_gguf(path).tensors.values()
             if len(t.ne) > 1 and "gate_inp" not in t.name}
    assert types == {qtype}, f"{kind}: {types}"


def test_exact_path_logits_and_greedy_tokens(case):
    kind, qtype, path, ref, ids, expected = case
    llm = make_llm(path)
    diff = (logits_in_chunks(llm.engine, ids, [70]) - expected).abs().max().item()
    assert diff <= LOGIT_TOL, f"{kind} {qtype}: max |logit diff| = {diff}"
    assert yun_greedy(llm, kind) == ref_greedy(ref, kind), f"{kind} {qtype}"


def test_native_kernels_stay_close(case):
    kind, qtype, path, _, ids, expected = case
    got = logits_in_chunks(make_llm(path, native_kernels=True).engine, ids, [70])
    assert_native_close(got, expected, f"{kind} {qtype}")
