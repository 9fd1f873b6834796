"""The one decoder skeleton of Llama, Qwen2/3, their MoE forms and DeepSeek-V3:

x -> embed -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head

Its attention and MLP are parts chosen by the architecture's `ArchSpec`
(yun/models/spec.py, picked in yun/models/registry.py): Llama's grouped-query attention
(yun/models/llama.py) or DeepSeek's MLA (yun/models/deepseek_v3.py); a dense SwiGLU MLP,
or per layer Qwen's or DeepSeek's mixture of experts (yun/models/qwen_moe.py).
Shapes: T = tokens in the step (all sequences, flat), E = hidden size.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from yun.config import ModelConfig
from yun.layers import decode_plan
from yun.layers.linear import Linear
from yun.layers.moe import expert_checkpoint_name, expert_weight_target
from yun.layers.norm import RMSNorm
from yun.layers.rotary import RotaryEmbedding
from yun.models import deepseek_v3, qwen_moe
from yun.models.deepseek_v3 import MLAttention
from yun.models.llama import MLP, Attention
from yun.models.spec import ArchSpec, LoaderHooks

AttentionPart = type[Attention] | type[MLAttention]
FfnPart = Callable[[ModelConfig, ArchSpec, int], nn.Module]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # computed here, in some checkpoints


def dense_ffn(cfg: ModelConfig, spec: ArchSpec, layer_idx: int) -> nn.Module:
    return MLP(cfg.hidden_size, cfg.intermediate_size, bias=spec.mlp_bias)


FFNS: dict[str, FfnPart] = {"none": dense_ffn, "qwen": qwen_moe.ffn,
                            "deepseek": deepseek_v3.ffn}


def attention_part(spec: ArchSpec) -> AttentionPart:
    return MLAttention if spec.attention == "mla" else Attention


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: ArchSpec, layer_idx: int,
                 cache_idx: int | None = None):
        """`cache_idx`: which of the forward context's caches the attention uses (default:
        layer_idx; DeepSeek's MTP layer, layer N of the checkpoint, has a list of its own)."""
        super().__init__()
        cache_idx = layer_idx if cache_idx is None else cache_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_part(spec)(cfg, spec, layer_idx, cache_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FFNS[spec.moe](cfg, spec, layer_idx)

    def plain_skeleton(self) -> bool:
        """True when this layer computes exactly what this class, Attention (without q/k
        norms) and MLP do: the steps yun/layers/decode_plan.py runs natively."""
        return (type(self).forward is DecoderLayer.forward
                and type(self.self_attn).forward is Attention.forward
                and self.self_attn.q_norm is None
                and type(self.mlp).forward is MLP.forward)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, E]; cos, sin: [T, rope dim] rows of the rotary table -> [T, E]."""
        x, h = self.post_attention_layernorm.add_forward(
            self.self_attn(self.input_layernorm(x), cos, sin), x)  # x += attn; h = norm(x)
        return x + self.mlp(h)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: ArchSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Checkpoint names are ours too, except the fused projections the parts list in
    their `stacked` tables and the experts (`weight_target`)."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec):
        super().__init__()
        if spec.encoder:
            raise ValueError(f"{cfg.architecture} is an encoder, not a decoder")
        self.cfg, self.spec = cfg, spec
        self.attention = attention_part(spec)
        self.model = DecoderModel(cfg, spec)
        # MLA models keep a torch head (and projections): --quantization leaves them dense.
        self.lm_head = (nn.Linear if spec.attention == "mla" else Linear)(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(self.attention.rope_dim(cfg), cfg.rope_theta,
                                      cfg.rope_scaling, cfg.max_position_embeddings)
        self.use_decode_plan = spec.attention == "gqa"  # all layers in one native call

    def tie_weights(self) -> None:
        """Share the embedding with the head when the spec says so (re-run after moves)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def loader_hooks(self) -> LoaderHooks:
        hooks = LoaderHooks(stacked={**self.attention.stacked, **MLP.stacked},
                            ignored_suffixes=IGNORED_SUFFIXES,
                            tied_head=self.spec.tie_word_embeddings, tie=self.tie_weights)
        if self.spec.moe != "none":  # experts.{i}.* -> the stacked experts
            hooks = replace(hooks, weight_target=expert_weight_target,
                            checkpoint_name=expert_checkpoint_name)
        if self.spec.mtp_in_checkpoint:
            hooks = replace(hooks, skip=self.is_mtp_weight)
        return hooks

    def is_mtp_weight(self, name: str) -> bool:
        """DeepSeek's multi-token-prediction module (`num_nextn_predict_layers`, stored as
        model.layers.{num_hidden_layers}.*) predicts one token further ahead; the target
        skips it and `--speculative-method mtp` loads it on its own (deepseek_mtp.py)."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return m is not None and int(m.group(1)) >= self.cfg.num_layers

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache, as the attention part lays it out."""
        return self.attention.cache_shape(self.cfg, num_blocks, block_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, E]."""
        x = self.model.embed_tokens(input_ids)  # [T, E]
        cos, sin = self.rotary.cos_sin_rows(positions, x.dtype)  # once per step
        out = decode_plan.run_layers(self, self.model.layers, x, cos, sin)  # decode steps
        if out is not None:
            return self.model.norm(out)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, E] -> logits [N, V] in float32."""
        return self.lm_head(hidden).float()
