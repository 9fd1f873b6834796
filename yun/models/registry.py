"""config.json `architectures[0]` -> its model class (imported lazily) and its spec: what
the architecture changes in the shared decoder (yun/models/decoder.py)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any, Callable

from torch import nn

from yun.config import ModelConfig
from yun.models.spec import ArchSpec


def llama(cfg: ModelConfig, **changes: Any) -> ArchSpec:
    """Llama's spec as its config says, with `changes`: the base of the others."""
    return replace(ArchSpec(qkv_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
                            tie_word_embeddings=cfg.tie_word_embeddings), **changes)


def qwen2_moe(cfg: ModelConfig) -> ArchSpec:
    return llama(cfg, qkv_bias=cfg.hf.get("qkv_bias", True), mlp_bias=False, moe="qwen")


def deepseek_v3(cfg: ModelConfig) -> ArchSpec:
    return ArchSpec(attention="mla", moe="deepseek", mtp_in_checkpoint=True,
                    tie_word_embeddings=cfg.tie_word_embeddings)


def bert(cfg: ModelConfig) -> ArchSpec:
    return ArchSpec(encoder=True, tie_word_embeddings=cfg.tie_word_embeddings)


@dataclass(frozen=True)
class Architecture:
    module: str
    cls: str
    spec: Callable[[ModelConfig], ArchSpec]


_DECODER = "yun.models.decoder"
_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(_DECODER, "DecoderForCausalLM", llama),
    # Qwen2 / Qwen2.5 (and the R1-Distill-Qwen models): Llama with a bias on Q, K and V.
    "Qwen2ForCausalLM": Architecture(_DECODER, "DecoderForCausalLM",
                                     lambda cfg: llama(cfg, qkv_bias=True)),
    # Qwen3: Llama with per-head RMSNorm on queries and keys, before RoPE.
    "Qwen3ForCausalLM": Architecture(_DECODER, "DecoderForCausalLM",
                                     lambda cfg: llama(cfg, qk_norm=True)),
    "Qwen2MoeForCausalLM": Architecture(_DECODER, "DecoderForCausalLM", qwen2_moe),
    "Qwen3MoeForCausalLM": Architecture(
        _DECODER, "DecoderForCausalLM",
        lambda cfg: llama(cfg, qk_norm=True, mlp_bias=False, moe="qwen")),
    # DeepSeek-V3 (V3.1, R1, Kimi-K2, Moonlight): MLA, DeepSeekMoE after dense layers.
    "DeepseekV3ForCausalLM": Architecture(_DECODER, "DecoderForCausalLM", deepseek_v3),
    "BertModel": Architecture("yun.models.bert", "BertModel", bert),  # embeddings only
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def _entry(architecture: str, config_path: str) -> Architecture:
    entry = _ARCHITECTURES.get(architecture)
    if entry is None:
        raise ValueError(
            f"{config_path}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}")
    return entry


def model_class(architecture: str, config_path: str = "config.json") -> type[nn.Module]:
    entry = _entry(architecture, config_path)
    return getattr(importlib.import_module(entry.module), entry.cls)


def arch_spec(cfg: ModelConfig, config_path: str = "config.json") -> ArchSpec:
    """What `cfg`'s architecture changes in the shared decoder, as its config says."""
    return _entry(cfg.architecture, config_path).spec(cfg)
