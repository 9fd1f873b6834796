"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B).

The attention is Qwen2's (QKV bias) or Qwen3's (q/k RMSNorm), chosen by the spec; the MLP
of a sparse layer becomes a mixture of experts:
    y = sum_k w_k * expert_k(x)                      (softmax router, top-k experts)
      + sigmoid(shared_expert_gate(x)) * shared_expert(x)      (Qwen2-MoE only)
Every `decoder_sparse_step`-th layer is sparse, except those in `mlp_only_layers`,
which keep a dense MLP of `intermediate_size`.

Shapes: T = tokens, E = hidden size, X = routed experts, K = experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from yun.config import ModelConfig
from yun.layers.moe import FusedExperts, softmax_topk
from yun.models.llama import MLP
from yun.models.spec import ArchSpec


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hf, E = cfg.hf, cfg.hidden_size
        self.top_k, self.renormalize = hf["num_experts_per_tok"], hf.get("norm_topk_prob", False)
        X = num_experts(hf)
        self.gate = nn.Linear(E, X, bias=False)  # router weight [X, E]
        self.experts = FusedExperts(X, E, hf["moe_intermediate_size"])
        shared = hf.get("shared_expert_intermediate_size") or 0
        self.shared_expert = MLP(E, shared, bias=False) if shared else None
        self.shared_expert_gate = nn.Linear(E, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)  # [T, K]
        out = self.experts(x, ids, weights)  # [T, E]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def num_experts(hf: dict) -> int:
    """Released configs say num_experts; transformers 5 writes num_local_experts."""
    return hf.get("num_experts") or hf.get("num_local_experts") or 0


def ffn(cfg: ModelConfig, spec: ArchSpec, layer_idx: int) -> nn.Module:
    """The sparse MoE block on the sparse layers, the dense SwiGLU on the others."""
    if is_sparse_layer(cfg.hf, layer_idx):
        return SparseMoeBlock(cfg)
    return MLP(cfg.hidden_size, cfg.intermediate_size, bias=spec.mlp_bias)


def is_sparse_layer(hf: dict, i: int) -> bool:
    return (i not in (hf.get("mlp_only_layers") or []) and num_experts(hf) > 0
            and (i + 1) % (hf.get("decoder_sparse_step") or 1) == 0)
