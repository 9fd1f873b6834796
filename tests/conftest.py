"""Shared fixtures: small random-weight checkpoints built with transformers (seeded),
saved with save_pretrained beside a Qwen2 tokenizer, loaded from that folder.

The tokenizer is the real Qwen2 one cut to its first SMALL_ORDINARY tokens (the 256 bytes
and the merges that build the rest, in Qwen's own rank order, so it is a consistent
byte-level BPE that encodes any text), with the 22 added tokens renumbered right after
them: a 152k-wide head and sampler cost most of a tiny model's time and test nothing.
Tests of the real vocabulary pass `real_vocab=True` (or use yun.demo's tokenizer)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from yun.demo import qwen2_tokenizer_json, write_qwen2_tokenizer

REAL_VOCAB = 151936  # the real Qwen2 vocabulary size (tokenizer ids go up to 151664)
REAL_ENDOFTEXT, REAL_IM_END = 151643, 151645
SMALL_ORDINARY = 4096  # ordinary tokens kept by the small tokenizer: ids 0..4095
ENDOFTEXT, IM_START, IM_END = SMALL_ORDINARY, SMALL_ORDINARY + 1, SMALL_ORDINARY + 2
VOCAB = SMALL_ORDINARY + 128  # the tiny models' vocabulary: the tokenizer's 4118, padded

BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    rms_norm_eps=1e-6, eos_token_id=IM_END, bos_token_id=ENDOFTEXT,
)
REAL_VOCAB_CONFIG: dict[str, Any] = dict(vocab_size=REAL_VOCAB, eos_token_id=REAL_IM_END,
                                         bos_token_id=REAL_ENDOFTEXT)


def small_qwen2_tokenizer_json(ordinary: int = SMALL_ORDINARY) -> str:
    """The real Qwen2 tokenizer.json cut to its first `ordinary` tokens (Qwen's merge k
    makes token 256 + k, so the first `ordinary` - 256 merges build exactly those), the
    added tokens renumbered from `ordinary` on in their order."""
    tok = json.loads(qwen2_tokenizer_json())
    model = tok["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < ordinary}
    model["merges"] = model["merges"][:ordinary - 256]
    first = min(a["id"] for a in tok["added_tokens"])
    for added in tok["added_tokens"]:
        added["id"] = added["id"] - first + ordinary
    return json.dumps(tok, ensure_ascii=False)


def write_small_qwen2_tokenizer(folder: str, max_length: int) -> None:
    """write_qwen2_tokenizer's two files (the Qwen2.5 chat template), the small vocabulary."""
    write_qwen2_tokenizer(folder, max_length=max_length)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(small_qwen2_tokenizer_json())

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
                     dtype: torch.dtype = torch.float32, real_vocab: bool = False) -> str:
    """A seeded random checkpoint of `arch` in `folder`: the small vocabulary and
    tokenizer, or the real 152k ones with `real_vocab`."""
    import transformers

    kwargs = {**BASE, **(REAL_VOCAB_CONFIG if real_vocab else {}), **arch}
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
    write = write_qwen2_tokenizer if real_vocab else write_small_qwen2_tokenizer
    write(folder, max_length=kwargs["max_position_embeddings"])
    return folder


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(kind: str = "qwen2", real_vocab: bool = False, **overrides: Any) -> str:
        key = kind + repr(real_vocab) + repr(sorted(overrides.items()))
        if key not in cache:
            folder = str(tmp_path_factory.mktemp(f"ckpt-{kind}"))
            cache[key] = build_checkpoint(folder, {**ARCHS[kind], **overrides},
                                          real_vocab=real_vocab)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def qwen2_path(checkpoint_factory) -> str:
    return checkpoint_factory("qwen2")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
