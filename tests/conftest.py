"""Shared fixtures: small random-weight checkpoints built with transformers (seeded),
saved with save_pretrained beside the real Qwen2 tokenizer, loaded from that folder."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from yun.demo import write_qwen2_tokenizer

VOCAB = 151936  # the real Qwen2 vocabulary size (tokenizer ids go up to 151664)

BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    rms_norm_eps=1e-6, eos_token_id=151645, bos_token_id=151643,
)

ARCHS: dict[str, dict[str, Any]] = {
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(architecture="Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=False,
                  rope_theta=1e6),
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False,
                  rope_theta=5e5, num_key_value_heads=1),
    "llama3": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, rope_theta=5e5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64},
                   attention_bias=True, mlp_bias=True),
}


def build_checkpoint(folder: str, arch: dict[str, Any], seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> str:
    import transformers

    kwargs = {**BASE, **arch}
    name = kwargs.pop("architecture")
    config_cls = getattr(transformers, name.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, name)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    # Give norms non-trivial weights so parity tests see them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    write_qwen2_tokenizer(folder, max_length=kwargs["max_position_embeddings"])
    return folder


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(kind: str = "qwen2", **overrides: Any) -> str:
        key = kind + repr(sorted(overrides.items()))
        if key not in cache:
            folder = str(tmp_path_factory.mktemp(f"ckpt-{kind}"))
            cache[key] = build_checkpoint(folder, {**ARCHS[kind], **overrides})
        return cache[key]

    return make


@pytest.fixture(scope="session")
def qwen2_path(checkpoint_factory) -> str:
    return checkpoint_factory("qwen2")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
