"""yun on GGUF files made by llama.cpp's converter and llama-quantize, every architecture
x {F32, F16, BF16, Q8_0}, against references that hold the same numbers.

The reference is the HF checkpoint the file was converted from with its weights rounded
as the file stores them (reference.rounded_reference: each weight, laid out as the
converter writes it and rounded to its type, must equal the file's tensor bit for bit).
It is exact for every architecture, including those transformers reads wrongly from
GGUF (Qwen2-MoE's shared-expert gate, expert widths) or not at all (deepseek2). Where
transformers reads the architecture, yun's greedy tokens must also equal transformers'
own greedy tokens on the GGUF file.

Tolerance: both sides compute in float32 from the same float32 numbers (yun's torch path
dequantizes F16/BF16/Q8_0 exactly), so logits differ only by summation order: 1e-4 for
every type. The native quantized kernels round activations too: their own test, looser.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.gguf.conftest import ARCHS, QTYPES, QWEN2_VOCAB, VOCAB
from tests.gguf.reference import read_gguf, rounded_reference, transformers_reference
from tests.helpers import ATTENTION_PATHS, logits_in_chunks
from yun import LLM, SamplingParams

KINDS = list(ARCHS)
NUM_TOKENS = 24
LOGIT_TOL = 1e-4
NATIVE_TOL = 5e-4

# Architectures transformers reads from GGUF; the value says whether it needs the HF
# config handed over (it ignores expert_feed_forward_length and builds 768-wide experts).
TRANSFORMERS_READS = {"llama": False, "qwen2": False, "qwen3": False, "qwen3moe": True}
# transformers parses a GGUF file's metadata twice with gguf.GGUFReader (seconds for a
# 49k-token vocabulary, more for Qwen2's 152k): its cross-check runs on the type it
# dequantizes (the rounded reference covers all four exactly).
TRANSFORMERS_TYPES = ["Q8_0"]


def vocab_of(kind: str) -> int:
    return QWEN2_VOCAB if kind == "qwen2" else VOCAB


def prompts(kind: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab_of(kind) - 300, (n,), generator=g).tolist() for n in (11, 37)]


def make_llm(model: str, native_kernels: bool = False) -> LLM:
    """native_kernels=False: the pure-torch path, which dequantizes each weight exactly and
    multiplies in float32. The native kernels (the default) round activations to integer
    blocks, so they are compared with a tolerance of their own."""
    return LLM(model, dtype="float32", kv_cache_memory=8 * 2**20, block_size=16,
               num_threads=1, native_kernels=native_kernels)


def yun_greedy(llm: LLM, kind: str) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(kind)],
                        SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@torch.no_grad()
def ref_greedy(ref: torch.nn.Module, kind: str) -> list[list[int]]:
    out = []
    for p in prompts(kind):
        g = ref.generate(torch.tensor([p]), max_new_tokens=NUM_TOKENS,
                         min_new_tokens=NUM_TOKENS, do_sample=False)
        out.append(g[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster and steadier than two on a shared machine."""


@pytest.fixture(scope="module")
def models(gguf_models):
    gguf_models.prefetch(KINDS)  # one converter run for all architectures
    return gguf_models


# F32 and Q8_0 for every architecture; F16 and BF16 (the same dense loading code for every
# family) each on two architectures, to keep the suite's time in check.
CASES = ([(k, q) for k in KINDS for q in ("F32", "Q8_0")]
         + [("llama", "F16"), ("qwen2moe", "F16"), ("qwen3", "BF16"), ("deepseek2", "BF16")])
assert {q for _, q in CASES} == set(QTYPES)


@pytest.fixture(scope="module", params=CASES,
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, models):
    kind, qtype = request.param
    path = models.gguf(kind, qtype)
    return kind, qtype, path, make_llm(path), rounded_reference(models.hf_dir(kind), path)


def test_greedy_tokens_equal_the_rounded_hf_reference(case):
    kind, qtype, _, llm, ref = case
    assert yun_greedy(llm, kind) == ref_greedy(ref, kind), f"{kind} {qtype}"


def test_logits_match_in_every_attention_path(case):
    kind, qtype, _, llm, ref = case
    ids = torch.randint(3, vocab_of(kind) - 300, (70,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    for chunks in ATTENTION_PATHS:
        diff = (logits_in_chunks(llm.engine, ids, chunks) - expected).abs().max().item()
        assert diff <= LOGIT_TOL, f"{kind} {qtype} chunks={chunks}: max |logit diff| = {diff}"


def assert_native_close(got: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    """The native kernels round each activation block of 32 to 16-bit integers
    (d = max|x| / 32767): a relative error of ~1.5e-5 per element, which moves these
    logits (|logit| <= ~2, two layers) by <= 1e-4 (measured 4e-5..9e-5). Bound: 5e-4,
    and 97% of positions keep their top token (a near tie may flip)."""
    diff = (got - expected).abs().max().item()
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert diff <= NATIVE_TOL and agree >= 0.97, \
        f"{label}: max |logit diff| {diff}, top-1 agreement {agree}"


@pytest.mark.parametrize("kind", KINDS)
def test_native_q8_0_kernels_stay_close(kind, models):
    path = models.gguf(kind, "Q8_0")
    ref = rounded_reference(models.hf_dir(kind), path)
    ids = torch.randint(3, vocab_of(kind) - 300, (70,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    got = logits_in_chunks(make_llm(path, native_kernels=True).engine, ids, [70])
    assert_native_close(got, expected, f"{kind} Q8_0")


@pytest.mark.parametrize("qtype", TRANSFORMERS_TYPES)
@pytest.mark.parametrize("kind", list(TRANSFORMERS_READS))
def test_greedy_tokens_equal_transformers_on_the_same_gguf(kind, qtype, models):
    path = models.gguf(kind, qtype)
    config_dir = models.hf_dir(kind) if TRANSFORMERS_READS[kind] else None
    ref = transformers_reference(path, config_dir)
    assert yun_greedy(make_llm(path), kind) == ref_greedy(ref, kind), f"{kind} {qtype}"


def test_a_folder_holding_one_gguf_loads_like_the_file(models):
    from yun.config import EngineConfig
    from yun.engine.engine import LLMEngine

    folder = models.folder_of("qwen3", "Q8_0")
    engine = LLMEngine(EngineConfig(model=folder, dtype="float32", kv_cache_memory=8 * 2**20,
                                    num_threads=1, native_kernels=False))
    ids = list(range(100, 140))
    by_folder = logits_in_chunks(engine, ids, [40])
    by_file = logits_in_chunks(make_llm(models.gguf("qwen3", "Q8_0")).engine, ids, [40])
    assert torch.equal(by_folder, by_file)


def model_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def test_q8_0_weights_stay_quantized_in_memory(models):
    """llama Q8_0: 8.5 bits per weight in the file; float32 copies would be 3.8x that."""
    path = models.gguf("llama", "Q8_0")
    header = read_gguf(path)
    assert {header.tensors[n].qtype for n in ("token_embd.weight", "output.weight",
                                              "blk.0.attn_q.weight")} == {8}  # Q8_0
    data = os.path.getsize(path) - header.data_start
    held = model_bytes(make_llm(path))
    assert held <= 1.3 * data, f"the model holds {held} bytes for {data} bytes of Q8_0 tensors"


HF_KEYS = ("head_dim", "moe_intermediate_size", "shared_expert_intermediate_size",
           "num_experts", "n_routed_experts", "num_experts_per_tok", "norm_topk_prob",
           "decoder_sparse_step", "n_group", "topk_group", "n_shared_experts",
           "first_k_dense_replace", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@pytest.mark.parametrize("kind", KINDS)
def test_config_from_the_metadata_equals_the_hf_folders(kind, models):
    """yun's config of the GGUF file equals its config of the HF folder the file came from
    (head_dim 128 for qwen3 where hidden / heads = 64, 2 KV heads, expert widths, MLA
    ranks, YaRN): a precise message where the parity tests would only see other logits."""
    from yun.config import ModelConfig

    hf = ModelConfig.from_folder(models.hf_dir(kind))
    gg = ModelConfig.load(models.gguf(kind, "F32"))
    for f in ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
              "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
              "eos_token_ids"):
        want, got = getattr(hf, f), getattr(gg, f)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, \
            f"{kind} {f}: HF folder {want!r}, GGUF {got!r}"
    for key in HF_KEYS:
        if key in hf.hf:
            assert gg.hf.get(key) == hf.hf[key], \
                f"{kind} {key}: HF folder {hf.hf[key]!r}, GGUF {gg.hf.get(key)!r}"
    if hf.rope_scaling:
        for key in ("rope_type", "factor", "original_max_position_embeddings"):
            assert (gg.rope_scaling or {}).get(key) == hf.rope_scaling[key], \
                f"{kind} rope_scaling[{key!r}]: HF {hf.rope_scaling}, GGUF {gg.rope_scaling}"
    else:
        assert not gg.rope_scaling, f"{kind}: GGUF rope_scaling {gg.rope_scaling}"
