"""Linear layers: fused projections (QKV, gate-up) and the skinny-matmul dispatch.

Decode multiplies a few rows by every weight matrix; with bfloat16 weights on an
AVX-512 CPU a native kernel streams the weights faster than torch's (see
yun/kernels). Everything else goes to F.linear. The runner picks the backend once
(`set_skinny_backend`); the layers only ask.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SkinnyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

SKINNY_MAX_ROWS = 4  # above this, torch's blocked GEMM wins (measured, see BENCHMARKS.md)
_skinny_bf16: SkinnyFn | None = None


def set_skinny_backend(fn: SkinnyFn | None) -> None:
    """Install (or remove, with None) the bf16 skinny-matmul kernel."""
    global _skinny_bf16
    _skinny_bf16 = fn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in] -> [T, out]; same result as F.linear up to float rounding."""
    fn = _skinny_bf16
    if (fn is not None and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS
            and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"):
        return fn(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One matmul for several projections; `output_sizes[i]` rows belong to part i.

    The loader fills part i from its own checkpoint tensor (see `part_slice`).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def part_slice(self, index: int) -> slice:
        start = sum(self.output_sizes[:index])
        return slice(start, start + self.output_sizes[index])
