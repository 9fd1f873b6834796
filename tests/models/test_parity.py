"""Our models against transformers: logits in float32 and greedy tokens."""

from __future__ import annotations

import pytest

from tests.helpers import assert_greedy_matches, assert_logits_match, reference_model
from yun import LLM

KINDS = ["qwen2", "qwen3", "llama", "llama3"]  # GQA, q/k-norm, kv_heads=1 + untied, llama3 rope


@pytest.fixture(scope="module", params=KINDS)
def pair(request, checkpoint_factory):
    path = checkpoint_factory(request.param)
    llm = LLM(path, dtype="float32", kv_cache_memory=8 * 2**20, block_size=16)
    return request.param, llm, reference_model(path)


def test_logits_match_transformers_across_blocks_and_paths(pair):
    kind, llm, ref = pair
    assert_logits_match(llm.engine, ref, kind)


def test_greedy_tokens_match_transformers_generate(pair):
    _, llm, ref = pair
    assert_greedy_matches(llm, ref, num_tokens=40)


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
