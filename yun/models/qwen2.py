"""Qwen2 / Qwen2.5 (and the R1-Distill-Qwen models): Llama with a bias on Q, K and V."""

from __future__ import annotations

from yun.config import ModelConfig
from yun.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def qkv_bias(cfg: ModelConfig) -> bool:
        return True
