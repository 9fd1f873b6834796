"""BERT encoders (`BertModel`: all-MiniLM, bge, e5, ...): the first encoder architecture,
for embeddings. Bidirectional attention over a padded batch; no KV cache, no sampling.

Post-norm Transformer (Devlin et al. 2019): x = LN(x + Attn(x)); x = LN(x + FFN(x)), with
learned absolute positions and token-type embeddings. Parameter names are the checkpoint's
(`embeddings.*`, `encoder.layer.N.*`), so weights load by name. Shapes: B = sequences,
L = padded length, E = hidden size, H = heads, D = head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yun.config import ModelConfig
from yun.models.spec import ArchSpec, LoaderHooks


def _act(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"hidden_act {name!r} is not supported for BertModel")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hf = cfg.hf
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(hf.get("type_vocab_size", 2), cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=hf.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
             + self.token_type_embeddings.weight[0])  # token type 0 for every token
        return self.LayerNorm(x)  # [B, L, E]


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.hidden_size
        self.heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.heads, E // self.heads).transpose(1, 2)  # [B, H, L, D]

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                             heads(self.value(x)), attn_mask=mask)
        return out.transpose(1, 2).reshape(B, L, E)


class BertDenseNorm(nn.Module):
    """dense -> add the residual -> LayerNorm (the `output` of attention and of the FFN)."""

    def __init__(self, cfg: ModelConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.hf.get("layer_norm_eps", 1e-12))

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        setattr(self, "self", BertSelfAttention(cfg))  # the checkpoint's name: attention.self
        self.output = BertDenseNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(getattr(self, "self")(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _act(cfg.hf.get("hidden_act", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # [B, L, I]


class BertLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class BertModel(nn.Module):
    """`encode(input_ids, attention_mask)` -> the last hidden states [B, L, E]."""

    is_encoder = True

    def __init__(self, cfg: ModelConfig, spec: ArchSpec):
        super().__init__()
        if not spec.encoder:
            raise ValueError(f"BertModel is an encoder; {cfg.path}: the spec says a decoder")
        if cfg.hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{cfg.path}: BertModel with position_embedding_type "
                             f"{cfg.hf['position_embedding_type']!r} is not supported")
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def loader_hooks(self) -> LoaderHooks:
        return LoaderHooks(ignored_suffixes=("position_ids",), skip=is_pooler_weight,
                           weight_target=unprefixed,
                           tied_head=self.cfg.tie_word_embeddings)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L] (mask 1 for real tokens) -> [B, L, E]."""
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: keys that count
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def is_pooler_weight(name: str) -> bool:
    return name.startswith("pooler.")  # the NSP pooler: not used for embeddings


def unprefixed(name: str) -> tuple[str, None] | None:
    """Checkpoints saved from BertForMaskedLM & co. prefix the encoder's names."""
    return (name.removeprefix("bert."), None) if name.startswith("bert.") else None
