"""RoPE scalings against transformers, at positions beyond the pretraining context.

Tiny Qwen2 / Qwen3 / Llama checkpoints (vocab 512) whose original context is 32
tokens: a 70-token prompt runs 38 positions past it. Float32 logits agree within 1e-4
through yun's paged path: a fresh prefill, a chunk after a cached prefix, and decode
steps. The length-dependent scalings (dynamic NTK, longrope) rotate each step with the
length its sequence reaches in that step; transformers does the same when it is fed the
same steps with its KV cache, so they are compared chunk for chunk.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import build_checkpoint
from tests.helpers import ATTENTION_PATHS, logits_in_chunks, reference_model
from yun import LLM, SamplingParams
from yun.config import ModelConfig

TINY = dict(vocab_size=512, eos_token_id=511, bos_token_id=510)
ARCH = {
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e4),
    "qwen3": dict(architecture="Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=False,
                  rope_theta=1e4),
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, rope_theta=1e4,
                  num_key_value_heads=1),
}
_HALF = {"qwen2": 8, "qwen3": 16, "llama": 8}  # head_dim / 2


def _longrope(kind: str) -> dict[str, Any]:
    n = _HALF[kind]
    return {"rope_type": "longrope", "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.0 + 0.6 * i for i in range(n)]}


# name -> (family, config overrides). max_position_embeddings as the checkpoints have
# it: Qwen's YaRN keeps the original length there; llama3 / longrope the stretched one.
SCALINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "yarn-qwen2": ("qwen2", dict(max_position_embeddings=32, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "yarn-qwen3-mscale": ("qwen3", dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5,
        "truncate": False})),
    "yarn-llama-attention-factor": ("llama", dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "attention_factor": 1.3})),
    "dynamic-qwen2": ("qwen2", dict(max_position_embeddings=32, rope_scaling={
        "rope_type": "dynamic", "factor": 4.0})),
    "dynamic-qwen3": ("qwen3", dict(max_position_embeddings=32, rope_scaling={
        "type": "dynamic", "factor": 3.0})),
    "dynamic-llama": ("llama", dict(max_position_embeddings=32, rope_scaling={
        "rope_type": "dynamic", "factor": 2.5})),
    "linear-qwen3": ("qwen3", dict(max_position_embeddings=32, rope_scaling={
        "type": "linear", "factor": 4.0})),
    "llama3-llama": ("llama", dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "longrope-llama": ("llama", dict(max_position_embeddings=128, rope_scaling=_longrope("llama"))),
    "longrope-qwen2": ("qwen2", dict(max_position_embeddings=128, rope_scaling=_longrope("qwen2"))),
}


@pytest.fixture(scope="module", params=list(SCALINGS))
def case(request, tmp_path_factory):
    family, overrides = SCALINGS[request.param]
    path = build_checkpoint(str(tmp_path_factory.mktemp(request.param)),
                            {**ARCH[family], **TINY, **overrides})
    llm = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, block_size=16)
    return request.param, llm, reference_model(path)


def _prompt(n: int = 70) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(3)).tolist()


@torch.no_grad()
def _reference_in_chunks(ref, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """transformers' logits when fed the same steps as yun (its KV cache between them),
    from a fresh rotary state (its dynamic rope remembers the longest input it saw)."""
    from transformers import DynamicCache

    rotary = ref.model.rotary_emb
    ref.model.rotary_emb = type(rotary)(ref.config)
    cache, rows, start = DynamicCache(config=ref.config), [], 0
    for n in chunks:
        out = ref(torch.tensor([ids[start:start + n]]), cache=cache, use_cache=True,
                  position_ids=torch.arange(start, start + n)[None])
        rows.append(out.logits[0].float())
        start += n
    return torch.cat(rows)


def test_logits_match_transformers_past_the_original_context(case):
    name, llm, ref = case
    ids = _prompt()
    length_dependent = SCALINGS[name][1]["rope_scaling"].get(
        "rope_type", SCALINGS[name][1]["rope_scaling"].get("type")) in ("dynamic", "longrope")
    whole = _reference_in_chunks(ref, ids, [len(ids)])
    for chunks in ATTENTION_PATHS:
        expected = _reference_in_chunks(ref, ids, chunks) if length_dependent else whole
        diff = (logits_in_chunks(llm.engine, ids, chunks) - expected).abs().max().item()
        assert diff <= 1e-4, f"{name} chunks={chunks}: max |logit diff| = {diff}"
    # The scaling is in effect: unscaled rope would give other logits past position 32.
    assert llm.engine.runner.model.rotary.kind != "default"


def test_greedy_decode_matches_transformers_generate(case):
    name, llm, ref = case
    prompt = _prompt(40)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)
    with torch.no_grad():
        g = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    want = g[0, len(prompt):].tolist()  # transformers stops at EOS; yun ignores it here
    assert len(want) >= 8 and out.outputs[0].token_ids[:len(want)] == want, name


def _cfg(**fields: Any) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                                  "num_attention_heads": 4, "num_hidden_layers": 1,
                                  "vocab_size": 10, **fields})


def test_scaling_is_read_from_every_config_spelling():
    old = _cfg(rope_theta=1e6, max_position_embeddings=32768,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    new = _cfg(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 32768})
    nested = _cfg(max_position_embeddings=32768, rope_parameters={"full_attention": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 32768}})
    for cfg in (old, new, nested):
        assert cfg.rope_theta == 1e6
        assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 32768}
        assert cfg.max_context_len == 131072  # Qwen2.5's 128k with YaRN x4
    # A top-level original length wins (as in transformers); else max_position_embeddings.
    top = _cfg(max_position_embeddings=4096, original_max_position_embeddings=1024,
               rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                             "long_factor": [2.0] * 8, "original_max_position_embeddings": 99})
    assert top.rope_scaling["original_max_position_embeddings"] == 1024
    assert top.max_context_len == 4096
    filled = _cfg(max_position_embeddings=2048, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert filled.rope_scaling["original_max_position_embeddings"] == 2048
    assert _cfg(max_position_embeddings=100, rope_scaling={
        "type": "dynamic", "factor": 2.0}).max_context_len == 200
    assert _cfg(rope_scaling={"type": "default"}).rope_scaling is None


def test_unknown_scaling_is_refused_with_its_name(tmp_path):
    from yun.layers.rotary import RotaryEmbedding

    with pytest.raises(NotImplementedError, match="'mrope'.*supported: default"):
        RotaryEmbedding(16, 1e4, {"rope_type": "mrope"}, 32)


def test_gguf_yarn_metadata_becomes_the_same_scaling():
    from yun.models.gguf_config import hf_config

    meta = {"general.architecture": "qwen2", "qwen2.embedding_length": 64,
            "qwen2.block_count": 1, "qwen2.attention.head_count": 4,
            "qwen2.context_length": 32768, "qwen2.rope.freq_base": 1e6,
            "qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 32768,
            "qwen2.rope.scaling.yarn_beta_fast": 16.0, "qwen2.rope.scaling.yarn_beta_slow": 2.0,
            "qwen2.rope.scaling.yarn_attn_factor": 1.2}
    cfg = ModelConfig.from_dict(hf_config(meta.get, 100, {"output.weight"}, "x.gguf"))
    assert cfg.rope_theta == 1e6
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0,
                                "beta_slow": 2.0, "attention_factor": 1.2,
                                "original_max_position_embeddings": 32768}
    assert cfg.max_context_len == 131072
