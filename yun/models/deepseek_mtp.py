"""DeepSeek-V3's multi-token-prediction (MTP) layer, as a proposer for speculative
decoding. The checkpoint keeps it as model.layers.{num_hidden_layers}.* (config:
`num_nextn_predict_layers`); the target model skips it, this module loads it alone.

At position i it reads the target's final hidden state h_i and the embedding of the
next token t_{i+1}, and predicts t_{i+2}:

    x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])  -> one full decoder layer (MLA
        attention over its own cache of earlier positions, MoE)  -> g_i
    logits = lm_head(shared_head.norm(g_i))

The embedding and the output head are the target's (DeepSeek-V3 shares them; the
checkpoint's copies, embed_tokens and shared_head.head of that layer, are not loaded).
The order of the concatenation and the zeroed embedding at position 0 follow vLLM's
and SGLang's DeepSeek MTP models.

Shapes: T = tokens, E = hidden size.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from yun.config import ModelConfig
from yun.layers.linear import Linear
from yun.layers.moe import expert_checkpoint_name, expert_weight_target
from yun.layers.norm import RMSNorm
from yun.layers.rotary import RotaryEmbedding
from yun.models.decoder import IGNORED_SUFFIXES, DecoderLayer
from yun.models.deepseek_v3 import MLAttention
from yun.models.errors import CheckpointError
from yun.models.llama import MLP
from yun.models.spec import ArchSpec, LoaderHooks

SHARED_WITH_TARGET = ("embed_tokens.", "shared_head.head.")  # the target's copies
OWN_TENSORS = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3MTP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: ArchSpec):
        super().__init__()
        E = cfg.hidden_size
        self.cfg = cfg
        self.enorm = RMSNorm(E, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(E, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * E, E, bias=False)
        # Layer N of the checkpoint (an MoE layer in V3), caching in cache 0 of its own.
        self.layer = DecoderLayer(cfg, spec, cfg.num_layers, cache_idx=0)
        self.shared_head = SharedHead(cfg)
        self.rotary = RotaryEmbedding(MLAttention.rope_dim(cfg), cfg.rope_theta,
                                      cfg.rope_scaling, cfg.max_position_embeddings)

    def loader_hooks(self) -> LoaderHooks:
        return LoaderHooks(stacked=MLP.stacked, ignored_suffixes=IGNORED_SUFFIXES,
                           weight_target=expert_weight_target,  # experts.{i}.* -> stacked
                           checkpoint_name=expert_checkpoint_name,
                           tied_head=self.cfg.tie_word_embeddings)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """embeds: [T, E] of t_{i+1}, hidden: [T, E] = h_i, positions: [T] = i -> g: [T, E]
        (before shared_head.norm: what the next chained step takes as its h)."""
        embeds = torch.where(positions[:, None] == 0, 0, embeds)  # not needed at position 0
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden.to(embeds.dtype))],
                                   dim=-1))  # [T, E]
        cos, sin = self.rotary.cos_sin_rows(positions, x.dtype)  # [T, R]
        return self.layer(x, cos, sin)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return MLAttention.cache_shape(self.cfg, num_blocks, block_size)


def mtp_layer_index(cfg: ModelConfig) -> int:
    """The checkpoint index of the MTP layer; ValueError for a model without one."""
    if cfg.architecture != "DeepseekV3ForCausalLM":
        raise ValueError(f"--speculative-method mtp needs a DeepSeek-V3-family model with a "
                         f"multi-token-prediction layer; {cfg.path} is {cfg.architecture}")
    if not cfg.hf.get("num_nextn_predict_layers"):
        raise ValueError(f"{cfg.path}: the config has no num_nextn_predict_layers: this "
                         "checkpoint has no multi-token-prediction layer for "
                         "--speculative-method mtp")
    if cfg.is_gguf:
        raise ValueError(f"{cfg.path}: --speculative-method mtp reads the MTP layer from a "
                         "Hugging Face safetensors checkpoint; GGUF files carry none")
    return cfg.num_layers


def mtp_tensors(tensors: Iterator[tuple[str, str, torch.Tensor]], index: int
                ) -> Iterator[tuple[str, str, torch.Tensor]]:
    """The MTP layer's tensors under this module's names ("layer." for the decoder
    layer's), from a checkpoint's (file, name, tensor) triples."""
    prefix = re.compile(rf"model\.layers\.{index}\.(.+)")
    found = False
    for path, name, tensor in tensors:
        m = prefix.fullmatch(name)
        if m is None:
            continue
        found = True
        rest = m.group(1)
        if rest.startswith(SHARED_WITH_TARGET):
            continue
        yield path, (rest if rest.startswith(OWN_TENSORS) else f"layer.{rest}"), tensor
    if not found:
        raise CheckpointError(f"the checkpoint has no tensors model.layers.{index}.*: "
                              "its multi-token-prediction layer was left out (config says "
                              "num_nextn_predict_layers), so --speculative-method mtp "
                              "cannot run")


def load_mtp(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
             quantization: str | None = None) -> DeepseekV3MTP:
    from yun.models.loader import build_empty_model, checkpoint_files, iter_tensors, load_tensors

    index = mtp_layer_index(cfg)
    files = checkpoint_files(cfg.path)
    model = build_empty_model(cfg, dtype, device, cfg.path, cls=DeepseekV3MTP)
    load_tensors(model, mtp_tensors(iter_tensors(files), index),
                 f"{cfg.path} (MTP layer model.layers.{index})", quantize_to=quantization)
    return model.eval()
