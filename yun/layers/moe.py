"""Mixture of experts: routers and the grouped expert compute over stacked weights.

Routers turn router logits into (weights, expert ids) per token:
- `softmax_topk`: Qwen2-MoE / Qwen3-MoE (softmax over all experts, keep the top k).
- `grouped_topk`: DeepSeek-V3 (sigmoid scores; choose with a bias-corrected score,
  limited to the best `topk_group` of `n_group` expert groups; weigh with the raw score).
`FusedExperts` runs each active expert once on the tokens routed to it.

Shapes: T = tokens, H = hidden size, E = routed experts, K = experts per token,
I = one expert's intermediate size.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from yun.layers.activation import silu_and_mul


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> weights [T, K] float32, ids [T, K]."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int,
                 topk_group: int, renormalize: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. logits: [T, E] float32, bias: [E] -> weights [T, K], ids [T, K].

    The bias (learned for load balance) only steers the choice; the weights are the
    unbiased sigmoid scores of the chosen experts, optionally renormalized, times `scale`.
    """
    T, E = logits.shape
    scores = logits.sigmoid()  # [T, E]
    choice = scores + bias  # [T, E]
    # A group's score is the sum of its two best experts; keep the best topk_group groups.
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)  # [T, G]
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
    group_mask.scatter_(1, group_idx, True)
    expert_mask = group_mask.repeat_interleave(E // n_group, dim=1)  # [T, E]
    choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


class ExpertLinear(nn.Module):
    """E bias-free linear maps stacked in one weight [E, out, in].

    Checkpoints store one tensor per expert (and per projection); part (e, i) is expert
    e's `output_sizes[i]` rows, which the loader fills from that tensor.
    """

    def __init__(self, num_experts: int, in_features: int, output_sizes: list[int]):
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.weight = nn.Parameter(torch.empty(num_experts, sum(output_sizes), in_features))

    def parts(self) -> list[tuple[int, int]]:
        return [(e, i) for e in range(self.weight.shape[0]) for i in range(len(self.output_sizes))]

    def part_slice(self, part: tuple[int, int]) -> tuple[int, slice]:
        e, i = part
        start = sum(self.output_sizes[:i])
        return e, slice(start, start + self.output_sizes[i])


class FusedExperts(nn.Module):
    """E SwiGLU experts: gate_up_proj.weight [E, 2I, H], down_proj.weight [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = ExpertLinear(num_experts, hidden, [intermediate, intermediate])
        self.down_proj = ExpertLinear(num_experts, intermediate, [hidden])

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H], ids/weights: [T, K] -> sum_k weights[t, k] * expert_{ids[t, k]}(x[t])."""
        K = ids.shape[1]
        flat = ids.flatten()  # [T*K], entry j is token j // K
        order = flat.argsort(stable=True)  # [T*K] assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync
        w = weights.flatten().to(x.dtype)  # [T*K]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]  # [n] assignments to expert e
            start += n
            tok = sel // K  # [n] their tokens
            h = F.linear(x.index_select(0, tok), self.gate_up_proj.weight[e])  # [n, 2I]
            h = F.linear(silu_and_mul(h), self.down_proj.weight[e])  # [n, H]
            out.index_add_(0, tok, h * w.index_select(0, sel).unsqueeze(1))
        return out


_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                "down_proj": ("down_proj", 0)}


def expert_weight_target(name: str) -> tuple[str, tuple[int, int]] | None:
    """'…experts.3.up_proj.weight' -> ('…experts.gate_up_proj.weight', (3, 1)); None for
    any other name. The loader's `weight_target` hook for FusedExperts."""
    m = _EXPERT_TENSOR.match(name)
    if m is None:
        return None
    ours, i = _EXPERT_PART[m.group(3)]
    return f"{m.group(1)}.{ours}.weight", (int(m.group(2)), i)


def expert_checkpoint_name(pname: str, part: object) -> str | None:
    """The inverse of `expert_weight_target`, for error messages."""
    if not (isinstance(part, tuple) and pname.endswith((".gate_up_proj.weight",
                                                        ".down_proj.weight"))):
        return None
    prefix, ours = pname.rsplit(".", 2)[:2]
    e, i = part
    ckpt = next(c for c, t in _EXPERT_PART.items() if t == (ours, i))
    return f"{prefix}.{e}.{ckpt}.weight"
