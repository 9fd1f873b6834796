"""Qwen3: Llama with per-head RMSNorm on queries and keys (before RoPE), no QKV bias."""

from __future__ import annotations

from yun.config import ModelConfig
from yun.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def qk_norm(cfg: ModelConfig) -> bool:
        return True
