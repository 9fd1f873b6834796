"""Our models against transformers: logits in float32 and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import logits_in_chunks, reference_model
from yun import LLM, SamplingParams

KINDS = ["qwen2", "qwen3", "llama", "llama3"]  # GQA, q/k-norm, kv_heads=1 + untied, llama3 rope


@pytest.fixture(scope="module", params=KINDS)
def pair(request, checkpoint_factory):
    path = checkpoint_factory(request.param)
    llm = LLM(path, dtype="float32", kv_cache_memory=8 * 2**20, block_size=16)
    return request.param, llm, reference_model(path)


def test_logits_match_transformers_across_blocks_and_paths(pair):
    kind, llm, ref = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151000, (70,), generator=g).tolist()  # spans 5 blocks of 16
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    # Fresh prefill, chunk after a cached prefix, and single-token decode steps.
    for chunks in ([70], [40, 29, 1], [16, 16, 1, 1, 36]):
        ours = logits_in_chunks(llm.engine, ids, chunks)
        diff = (ours - expected).abs().max().item()
        assert diff <= 1e-4, f"{kind} chunks={chunks}: max |logit diff| = {diff}"


def test_greedy_tokens_match_transformers_generate(pair):
    kind, llm, ref = pair
    prompt = list(range(1000, 1037))
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    with torch.no_grad():
        g = ref.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40,
                         do_sample=False)
    assert out.outputs[0].token_ids == g[0, len(prompt):].tolist()
    assert out.outputs[0].finish_reason == "length"


def test_llama3_rope_scaling_is_read_from_either_config_style(checkpoint_factory):
    from yun.config import ModelConfig

    cfg = ModelConfig.from_folder(checkpoint_factory("llama3"))
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0
    released = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "vocab_size": 10, "rope_theta": 5e5, "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert released.rope_theta == 5e5 and released.rope_scaling["rope_type"] == "linear"
    assert released.torch_dtype == "bfloat16"
