"""DeepSeek-V3's parts (and V3.1, R1, Kimi-K2, Moonlight: the same architecture), for
the decoder of yun/models/decoder.py: x -> embed -> N x [x + MLA(norm(x)); x + FFN(norm(x))]
-> norm -> lm_head.
- MLA (multi-head latent attention): keys and values come from one low-rank latent per
  token (kv_lora_rank) plus one shared rotary key (qk_rope_head_dim); only those are
  cached (see yun/layers/mla_attention.py). Queries go through their own low-rank
  bottleneck (q_lora_rank), or a plain projection when q_lora_rank is null.
- FFN: dense SwiGLU in the first `first_k_dense_replace` layers, then DeepSeekMoE
  (every `moe_layer_freq`-th layer): routed experts chosen by group-limited sigmoid
  top-k, plus always-on shared experts.

Shapes: T = tokens, E = hidden size, H = heads, Dn = qk_nope_head_dim,
R = qk_rope_head_dim, Dv = v_head_dim, L = kv_lora_rank, X = routed experts.
"""

from __future__ import annotations

import torch
from torch import nn

from yun.config import ModelConfig
from yun.layers.context import get_forward_context
from yun.layers.mla_attention import mla_attention
from yun.layers.moe import FusedExperts, grouped_topk
from yun.layers.norm import RMSNorm
from yun.layers.rotary import apply_rope
from yun.layers.yarn import yarn_mscale
from yun.models.llama import MLP
from yun.models.spec import ArchSpec


class MLAttention(nn.Module):
    stacked: dict[str, tuple[str, int]] = {}  # no fused projections

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, layer_idx: int, cache_idx: int):
        super().__init__()
        hf, E, bias = cfg.hf, cfg.hidden_size, cfg.attention_bias
        self.layer_idx = cache_idx  # its cache in the forward context's kv_caches
        self.h, self.L = cfg.num_heads, hf["kv_lora_rank"]
        self.dn, self.r, self.dv = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        q_out = self.h * (self.dn + self.r)
        self.q_lora = bool(hf.get("q_lora_rank"))  # null in smaller models: one projection
        if self.q_lora:
            self.q_a_proj = nn.Linear(E, hf["q_lora_rank"], bias=bias)
            self.q_a_layernorm = RMSNorm(hf["q_lora_rank"])
            self.q_b_proj = nn.Linear(hf["q_lora_rank"], q_out, bias=False)
        else:
            self.q_proj = nn.Linear(E, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(E, self.L + self.r, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.L)
        self.kv_b_proj = nn.Linear(self.L, self.h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.h * self.dv, E, bias=bias)
        # DeepSeek pairs rope dims as (x0, x1), (x2, x3), ...; de-interleaving them first
        # makes it the usual rotate-halves rope (as transformers' `rope_interleave`).
        self.interleaved = hf.get("rope_interleave", True)
        self.scale = (self.dn + self.r) ** -0.5 * softmax_mscale(cfg) ** 2

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        return cfg.hf["qk_rope_head_dim"]

    @staticmethod
    def cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: the latent and the rope key of every slot."""
        return (num_blocks, block_size, cfg.hf["kv_lora_rank"] + cfg.hf["qk_rope_head_dim"])

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, E]; cos, sin: [T, R] rows of the rotary table -> [T, E]."""
        T = x.shape[0]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, R]: broadcast over heads
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [T, H * (Dn + R)]
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(T, self.h, self.dn + self.r).split([self.dn, self.r], -1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.L, self.r], -1)  # [T, L], [T, R]
        kv_c = self.kv_a_layernorm(kv_c)
        q_pe = self.rope(q_pe, cos, sin)  # [T, H, R]
        k_pe = self.rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # [T, R]
        cache = get_forward_context().kv_caches[self.layer_idx]  # [NB, BS, L + R]
        w_kv_b = self.kv_b_proj.weight.view(self.h, self.dn + self.dv, self.L)
        o = mla_attention(q_nope, q_pe, kv_c, k_pe, w_kv_b, cache, self.scale)  # [T, H, Dv]
        return self.o_proj(o.reshape(T, self.h * self.dv))


class Router(nn.Module):
    """gate.weight [X, E] and the load-balancing bias [X], both kept in float32."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts),
                                                    requires_grad=False)

    def build_buffers(self, device: torch.device | str) -> None:
        """Run by the loader after the model's dtype cast: route in float32, as the
        reference does (bf16 would blur the small score differences the bias decides)."""
        self.weight.data = self.weight.data.float()
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.float().t()  # [T, X] float32


class DeepseekMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hf, E = cfg.hf, cfg.hidden_size
        self.top_k, self.n_group, self.topk_group = (
            hf["num_experts_per_tok"], hf.get("n_group") or 1, hf.get("topk_group") or 1)
        self.renormalize = hf.get("norm_topk_prob", True)
        self.scale = hf.get("routed_scaling_factor", 1.0)
        self.gate = Router(E, hf["n_routed_experts"])
        self.experts = FusedExperts(hf["n_routed_experts"], E, hf["moe_intermediate_size"])
        n_shared = hf.get("n_shared_experts") or 0
        self.shared_experts = (MLP(E, hf["moe_intermediate_size"] * n_shared, bias=False)
                               if n_shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = grouped_topk(self.gate(x), self.gate.e_score_correction_bias,
                                    self.top_k, self.n_group, self.topk_group,
                                    self.renormalize, self.scale)  # [T, K] each
        out = self.experts(x, ids, weights)  # [T, E]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def ffn(cfg: ModelConfig, spec: ArchSpec, layer_idx: int) -> nn.Module:
    """DeepSeekMoE on the MoE layers, the dense SwiGLU on the others."""
    if is_moe_layer(cfg.hf, layer_idx):
        return DeepseekMoE(cfg)
    return MLP(cfg.hidden_size, cfg.intermediate_size, bias=spec.mlp_bias)


def is_moe_layer(hf: dict, i: int) -> bool:
    return (bool(hf.get("n_routed_experts")) and i >= hf.get("first_k_dense_replace", 0)
            and i % (hf.get("moe_layer_freq") or 1) == 0)


def softmax_mscale(cfg: ModelConfig) -> float:
    """YaRN's extra attention temperature: the softmax scale is multiplied by its square."""
    s = cfg.rope_scaling or {}
    if s.get("mscale_all_dim"):
        return yarn_mscale(s["factor"], s["mscale_all_dim"])
    return 1.0
