"""Tensor parallelism as a transform of a loaded plain model (gpt-fast style).

`shard_model(model, tp)` slices the parameters so that rank r of N keeps its share:
- attention: query heads [r*H/N, (r+1)*H/N) and the KV heads they read (split evenly,
  or one per rank, replicated, when KvH < N); the fused QKV projection is column-parallel
  with q, k and v sliced separately; the output projection is row-parallel.
- MLP: gate and up column-parallel (each part sliced on its own), down row-parallel.
- MoE: every expert's intermediate dimension is split like the MLP's (all ranks hold
  every expert, a 1/N slice of each, and route identically with the whole router);
  shared experts likewise. Each rank's work is the same whatever the routing.
- MLA (DeepSeek): heads split in q and kv_b; output row-parallel. The cache holds one
  latent per token, not per head, so every rank caches all of it.
- embedding and head: vocabulary-parallel (rows [r*S, (r+1)*S), S = ceil(V/N), the last
  shard zero-padded): the embedding masks other ranks' ids and all-reduces; the head's
  logit slices are gathered on rank 0, which samples.
A row-parallel block leaves a partial sum on every rank: one all-reduce (a forward hook
on the attention, MLP or MoE block) completes it; biases added before that sum are kept
on rank 0 only.

`shard_model` works on a loaded model (it cuts the weights in place) and on one built on
the meta device, where it only shapes the parameters: it returns the `Cut` of every
parameter it changed, by name, and the loader then reads just those positions of each
checkpoint tensor (yun/models/slices.py), so a rank never holds the whole model.

Shapes: H = query heads, KvH = KV heads, D = head_dim, I = intermediate size, X = experts,
E = hidden size, V = vocabulary, N = ranks.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from yun.config import ModelConfig
from yun.layers.linear import linear
from yun.layers.moe import FusedExperts
from yun.models.deepseek_v3 import MLAttention
from yun.models.llama import MLP, Attention
from yun.models.slices import Cut

Cuts = dict[int, Cut]  # id(new parameter) -> its cut, while sharding

class Collectives(Protocol):
    """What a sharded model needs of its tensor-parallel group (parallel.TensorParallel
    is one): this rank's place, the sum over ranks, the gather on rank 0."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None: ...


def check_shardable(cfg: ModelConfig, n: int) -> None:
    """ValueError naming the dimension that does not split over n ranks."""
    if n == 1:
        return
    hf = cfg.hf
    sizes = {"attention heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size}
    if hf.get("moe_intermediate_size"):
        sizes["moe_intermediate_size"] = hf["moe_intermediate_size"]
    if hf.get("shared_expert_intermediate_size"):
        sizes["shared_expert_intermediate_size"] = hf["shared_expert_intermediate_size"]
    for what, size in sizes.items():
        if size % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide the model's {size} "
                             f"{what}")
    kvh = cfg.num_kv_heads
    if "kv_lora_rank" not in hf and kvh % n and n % kvh:
        raise ValueError(f"tensor_parallel_size={n} and the model's {kvh} KV heads: one must "
                         "divide the other")


@torch.no_grad()
def shard_model(model: nn.Module, tp: Collectives) -> dict[str, Cut]:
    """Keep rank tp.rank's share of every weight, in place; install the collectives.
    Returns what was kept of each sharded parameter, by name (for the loader, when the
    model is on the meta device); parameters not named are replicated."""
    n, r = tp.world_size, tp.rank
    check_shardable(model.cfg, n)
    from yun.layers.quant_linear import QuantWeight

    if any(isinstance(m, QuantWeight) for m in model.modules()):
        raise ValueError("tensor parallelism cuts quantized GGUF weights while loading "
                         "them (load_model(..., shard=...)), not after")
    cuts: Cuts = {}
    reduce = _all_reduce_hook(tp)
    for layer in model.model.layers:
        attn = layer.self_attn
        if isinstance(attn, Attention):
            _shard_gqa(attn, r, n, cuts)
        elif isinstance(attn, MLAttention):
            _shard_mla(attn, r, n, cuts)
        else:
            raise NotImplementedError(f"tensor parallelism: unknown attention {type(attn)}")
        _shard_ffn(layer.mlp, r, n, cuts)
        attn.register_forward_hook(reduce)
        layer.mlp.register_forward_hook(reduce)
    _shard_vocab(model, tp, cuts)
    first = model.model.layers[0].self_attn  # what the KV-cache shape reads
    kvh = getattr(first, "kvh", model.cfg.num_kv_heads)
    model.cfg = replace(model.cfg, num_heads=first.h, num_kv_heads=kvh)
    model.use_decode_plan = False  # the plan runs every layer in C++: no all-reduce hooks
    return {name: cuts[id(p)] for name, p in model.named_parameters() if id(p) in cuts}


def _all_reduce_hook(tp: Collectives):
    def hook(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return tp.all_reduce(output)

    return hook


# ---- slicing helpers -----------------------------------------------------------------------
def _keep(param: nn.Parameter | None, index: torch.Tensor, dim: int, cuts: Cuts,
          full_sizes: list[int] | None = None) -> nn.Parameter | None:
    if param is None:
        return None
    data = param.data.index_select(dim, index.to(param.device)).contiguous()
    kept = nn.Parameter(data, requires_grad=False)
    cuts[id(kept)] = Cut(dim, index, tuple(full_sizes or [param.shape[dim]]))
    return kept


def _spans(starts: list[int], length: int) -> torch.Tensor:
    """Indices of the spans [s, s + length) for each s, in order."""
    return torch.cat([torch.arange(s, s + length) for s in starts])


def _keep_rows(lin: nn.Linear, index: torch.Tensor, cuts: Cuts) -> None:
    """Column-parallel: keep these output features (weight rows, bias entries)."""
    sizes = getattr(lin, "output_sizes", None)
    lin.weight = _keep(lin.weight, index, 0, cuts, sizes)
    lin.bias = _keep(lin.bias, index, 0, cuts, sizes)
    lin.out_features = len(index)


def _keep_cols(lin: nn.Linear, index: torch.Tensor, rank: int, cuts: Cuts) -> None:
    """Row-parallel: keep these input features; the bias is added once (rank 0)."""
    lin.weight = _keep(lin.weight, index, 1, cuts)
    lin.in_features = len(index)
    if lin.bias is not None and rank != 0:
        lin.bias.data.zero_()
        cuts[id(lin.bias)] = Cut(None, zero=True)


# ---- blocks --------------------------------------------------------------------------------
def _shard_gqa(attn: Attention, r: int, n: int, cuts: Cuts) -> None:
    H, KvH, D = attn.h, attn.kvh, attn.d
    h = H // n
    if KvH >= n:
        kvh, kv_first = KvH // n, r * (KvH // n)
    else:  # fewer KV heads than ranks: each rank keeps (a copy of) the one its queries read
        kvh, kv_first = 1, r * KvH // n
    rows = torch.cat([_spans([r * h * D], h * D),  # [q | k | v] rows of the fused weight
                      H * D + _spans([kv_first * D], kvh * D),
                      (H + KvH) * D + _spans([kv_first * D], kvh * D)])
    _keep_rows(attn.qkv_proj, rows, cuts)
    attn.qkv_proj.output_sizes = [h * D, kvh * D, kvh * D]
    _keep_cols(attn.o_proj, _spans([r * h * D], h * D), r, cuts)
    attn.h, attn.kvh = h, kvh


def _shard_mla(attn: MLAttention, r: int, n: int, cuts: Cuts) -> None:
    h = attn.h // n
    heads = range(r * h, (r + 1) * h)
    q = attn.q_b_proj if attn.q_lora else attn.q_proj
    per_q, per_kv = attn.dn + attn.r, attn.dn + attn.dv
    _keep_rows(q, _spans([i * per_q for i in heads], per_q), cuts)
    _keep_rows(attn.kv_b_proj, _spans([i * per_kv for i in heads], per_kv), cuts)
    _keep_cols(attn.o_proj, _spans([r * h * attn.dv], h * attn.dv), r, cuts)
    attn.h = h


def _shard_mlp(mlp: MLP, r: int, n: int, cuts: Cuts) -> None:
    I = mlp.gate_up_proj.output_sizes[0]  # noqa: E741
    i = I // n
    _keep_rows(mlp.gate_up_proj, _spans([r * i, I + r * i], i), cuts)
    mlp.gate_up_proj.output_sizes = [i, i]
    _keep_cols(mlp.down_proj, _spans([r * i], i), r, cuts)


def _shard_experts(experts: FusedExperts, r: int, n: int, cuts: Cuts) -> None:
    gate_up, down = experts.gate_up_proj, experts.down_proj  # [X, 2I, E], [X, E, I]
    I = gate_up.output_sizes[0]  # noqa: E741
    i = I // n
    gate_up.weight = _keep(gate_up.weight, _spans([r * i, I + r * i], i), 1, cuts, [I, I])
    gate_up.output_sizes = [i, i]
    down.weight = _keep(down.weight, _spans([r * i], i), 2, cuts)


def _shard_ffn(mlp: nn.Module, r: int, n: int, cuts: Cuts) -> None:
    if isinstance(mlp, MLP):
        _shard_mlp(mlp, r, n, cuts)
    elif isinstance(getattr(mlp, "experts", None), FusedExperts):  # an MoE block
        _shard_experts(mlp.experts, r, n, cuts)
        for child in mlp.children():  # shared experts; the router stays whole
            if isinstance(child, MLP):
                _shard_mlp(child, r, n, cuts)
    else:
        raise NotImplementedError(f"tensor parallelism: unknown MLP {type(mlp)}")


# ---- vocabulary ----------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + size) of the table (padded to the shard size)."""

    def __init__(self, weight: nn.Parameter, start: int, size: int, tp: Collectives):
        super().__init__()
        self.weight, self.start, self.size, self.tp = weight, start, size, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.size)  # [T]
        x = F.embedding(torch.where(mine, local, 0), self.weight)  # [T, E]
        return self.tp.all_reduce(x.masked_fill(~mine.unsqueeze(-1), 0))


class VocabParallelHead(nn.Module):
    """The head's rows for this rank's vocabulary shard; logits gathered on rank 0."""

    def __init__(self, weight: nn.Parameter, vocab: int, tp: Collectives):
        super().__init__()
        self.weight, self.vocab, self.tp = weight, vocab, tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        part = linear(hidden, self.weight)  # [N, S]
        full = self.tp.gather_to_driver(part)  # rank 0: [N, ranks * S]; else None
        return part if full is None else full[:, :self.vocab]  # [N, V] on rank 0


def _shard_vocab(model: nn.Module, tp: Collectives, cuts: Cuts) -> None:
    embed, head = model.model.embed_tokens, model.lm_head
    if head.bias is not None:
        raise NotImplementedError("tensor parallelism: a head with a bias")
    V, n, r = embed.weight.shape[0], tp.world_size, tp.rank
    S = math.ceil(V / n)
    start, size = r * S, max(0, min(S, V - r * S))

    def shard(w: torch.Tensor) -> nn.Parameter:  # [V, E] -> [S, E], zero-padded
        out = w.new_zeros(S, w.shape[1])
        out[:size] = w[start:start + size]
        kept = nn.Parameter(out, requires_grad=False)
        cuts[id(kept)] = Cut(0, torch.arange(start, start + size), (V,))
        return kept

    tied = head.weight is embed.weight
    embed_w = shard(embed.weight)
    model.model.embed_tokens = VocabParallelEmbedding(embed_w, start, size, tp)
    model.lm_head = VocabParallelHead(embed_w if tied else shard(head.weight), V, tp)
