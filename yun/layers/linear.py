"""Fused projections: several checkpoint matrices stored as one (QKV, gate-up)."""

from __future__ import annotations

from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections; `output_sizes[i]` rows belong to part i.

    The loader fills part i from its own checkpoint tensor (see `part_slice`).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def part_slice(self, index: int) -> slice:
        start = sum(self.output_sizes[:index])
        return slice(start, start + self.output_sizes[index])
