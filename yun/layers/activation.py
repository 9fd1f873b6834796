"""Gated activations over fused projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yun.layers import fused


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] holding gate then up -> [T, I]."""
    ops = fused.ops_for(x)
    if ops is not None and x.dim() == 2:
        return ops.silu_and_mul(x.contiguous())
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
