"""Llama-style decoder (Llama 2/3.x), the base that Qwen2 and Qwen3 specialise.

x -> embed -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head
Shapes: T = tokens in the step (all sequences, flat), H = heads, KvH = KV heads,
D = head_dim, E = hidden size, I = intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn

from yun.config import ModelConfig
from yun.layers.activation import silu_and_mul
from yun.layers.attention import paged_attention, qkv_attention
from yun.layers import decode_plan
from yun.layers.context import get_forward_context
from yun.layers.linear import Linear, MergedLinear
from yun.layers.norm import RMSNorm
from yun.layers.rotary import RotaryEmbedding, apply_rope_


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size,
                                     [self.h * self.d, self.kvh * self.d, self.kvh * self.d],
                                     bias=qkv_bias)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if qk_norm else None
        self.scale = self.d ** -0.5
        self.window = cfg.sliding_window(layer_idx)  # None: full attention

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
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # [T, I] -> [T, E]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, qkv_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.make_mlp(cfg, layer_idx)

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def plain_skeleton(self) -> bool:
        """True when this layer computes exactly what this class, Attention (without q/k
        norms) and MLP do: the steps yun/layers/decode_plan.py runs natively."""
        return (type(self).forward is DecoderLayer.forward
                and type(self.self_attn).forward is Attention.forward
                and self.self_attn.q_norm is None
                and type(self.mlp).forward is MLP.forward)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_forward(
            self.self_attn(self.input_layernorm(x), cos, sin), x)  # x += attn; h = norm(x)
        return x + self.mlp(h)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls: type[DecoderLayer], qkv_bias: bool,
                 qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            layer_cls(cfg, i, qkv_bias, qk_norm) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Checkpoint names are ours too, except the fused projections listed in `stacked`."""

    stacked: dict[str, tuple[str, int]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    layer_cls: type[DecoderLayer] = DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg, self.layer_cls, self.qkv_bias(cfg), self.qk_norm(cfg))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings)

    def tie_weights(self) -> None:
        """Share the embedding with the head when the config says so (re-run after moves)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def qkv_bias(cfg: ModelConfig) -> bool:
        return cfg.attention_bias

    @staticmethod
    def qk_norm(cfg: ModelConfig) -> bool:
        return False

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: K and V for every slot."""
        return (2, num_blocks, block_size, self.cfg.num_kv_heads, self.cfg.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, E]."""
        x = self.model.embed_tokens(input_ids)  # [T, E]
        cos, sin = self.rotary.cos_sin_rows(positions, x.dtype)  # [T, D], once per step
        out = decode_plan.run_layers(self, self.model.layers, x, cos, sin)  # decode steps
        if out is not None:
            return self.model.norm(out)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, E] -> logits [N, V] in float32."""
        return self.lm_head(hidden).float()
