"""Llama's parts (Llama 2/3.x, and Qwen2/Qwen3 by their spec): grouped-query attention,
with a QKV bias (Qwen2) or per-head q/k RMSNorm before RoPE (Qwen3), and the SwiGLU MLP.
The decoder they plug into is yun/models/decoder.py.

Shapes: T = tokens in the step (all sequences, flat), H = heads, KvH = KV heads,
D = head_dim, E = hidden size, I = intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn

from yun.config import ModelConfig
from yun.layers.activation import silu_and_mul
from yun.layers.attention import paged_attention, qkv_attention
from yun.layers.context import get_forward_context
from yun.layers.linear import Linear, MergedLinear
from yun.layers.norm import RMSNorm
from yun.layers.rotary import apply_rope_
from yun.models.spec import ArchSpec


class Attention(nn.Module):
    stacked: dict[str, tuple[str, int]] = {  # checkpoint names of the fused projection
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, layer_idx: int, cache_idx: int):
        super().__init__()
        self.layer_idx = cache_idx  # its cache in the forward context's kv_caches
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size,
                                     [self.h * self.d, self.kvh * self.d, self.kvh * self.d],
                                     bias=spec.qkv_bias)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if spec.qk_norm else None
        self.scale = self.d ** -0.5
        self.window = cfg.sliding_window(layer_idx)  # None: full attention

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        return cfg.head_dim

    @staticmethod
    def cache_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: K and V for every slot."""
        return (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, E]; cos, sin: [T, D] rows of the rotary table -> [T, E]."""
        T, h, kvh, d = x.shape[0], self.h, self.kvh, self.d
        qkv = self.qkv_proj(x)  # [T, (H + 2 KvH) * D]: q, k, v heads
        ctx = get_forward_context()
        cache = ctx.kv_caches[self.layer_idx]  # sized for this layer's KV-cache group
        meta = ctx.attn.for_window(self.window)  # and its group's tables and slots
        if self.q_norm is None:  # rotary, cache write and attention: one call at decode
            return self.o_proj(qkv_attention(qkv, h, kvh, cos, sin, cache, self.scale,
                                              meta, window=self.window))
        heads = qkv.view(T, h + 2 * kvh, d)  # [T, H + 2 KvH, D]
        q, k = self.q_norm(heads[:, :h]), self.k_norm(heads[:, h:h + kvh])
        q, k = apply_rope_(q, cos, sin), apply_rope_(k, cos, sin)
        o = paged_attention(q, k, heads[:, h + kvh:], cache, self.scale, meta,
                            window=self.window)  # [T, H, D]
        return self.o_proj(o.reshape(T, h * d))


class MLP(nn.Module):
    stacked: dict[str, tuple[str, int]] = {
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # [T, I] -> [T, E]
