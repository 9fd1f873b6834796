"""Linear layers: fused projections (QKV, gate-up) and the bf16 matmul dispatch.

With bfloat16 weights on an AVX-512 CPU without native bf16 math, torch's matmuls
run far below the machine's speed; native kernels (yun/kernels) take over: a
bandwidth-bound one for a few rows (decode) and a blocked one for many rows (prefill,
batched decode). fp32 weights at a few rows take the fp32 twin of the bandwidth-bound
kernel (torch's fp32 GEMV streams at ~40% of the bandwidth). Everything else goes to F.linear. The runner picks the kernels once,
in its `Backend` (yun/layers/backend.py); the layers ask `current()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yun.layers.backend import current

SKINNY_MAX_ROWS = 4  # up to this many rows the weight-streaming kernel is used


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in] -> [T, out]; same result as F.linear up to float rounding."""
    backend = current()
    if x.dim() == 2 and weight.device.type == "cpu":
        if backend.bf16 is not None and weight.dtype == torch.bfloat16:  # (few, many rows)
            return backend.bf16[0 if x.shape[0] <= SKINNY_MAX_ROWS else 1](x, weight, bias)
        if (backend.f32 is not None and weight.dtype == torch.float32
                and x.dtype == torch.float32 and x.shape[0] <= SKINNY_MAX_ROWS
                and weight.is_contiguous()):
            return backend.f32(x, weight, bias)  # decode_step.cpp's skinny_f32: the same test
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
