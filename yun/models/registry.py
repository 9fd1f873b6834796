"""config.json `architectures[0]` -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("yun.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("yun.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("yun.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen2MoeForCausalLM": ("yun.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("yun.models.qwen_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV3ForCausalLM": ("yun.models.deepseek_v3", "DeepseekV3ForCausalLM"),
    "BertModel": ("yun.models.bert", "BertModel"),  # an encoder: embeddings only
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(architecture: str, config_path: str = "config.json") -> type[nn.Module]:
    entry = _ARCHITECTURES.get(architecture)
    if entry is None:
        raise ValueError(
            f"{config_path}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}")
    module, name = entry
    return getattr(importlib.import_module(module), name)
