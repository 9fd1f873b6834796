"""Native fused elementwise ops (yun/kernels/elementwise.cpp: RMSNorm, SiLU-and-mul,
rotary embedding), chosen by the runner on CPU (its `Backend.fused`). The layers ask
`ops_for(x)` and keep their torch code as the fallback, which is also the reference the
kernels are tested against."""

from __future__ import annotations

from typing import Any

import torch

from yun.layers.backend import current

DTYPES = (torch.float32, torch.bfloat16)


def ops_for(x: torch.Tensor) -> Any:
    """The current backend's fused-ops extension when it runs on x, else None (torch)."""
    ops = current().fused
    if ops is not None and x.device.type == "cpu" and x.dtype in DTYPES:
        return ops
    return None


def usable(x: torch.Tensor) -> bool:
    return ops_for(x) is not None
