"""Native fused elementwise ops (yun/kernels/elementwise.cpp: RMSNorm, SiLU-and-mul,
rotary embedding), installed by the runner on CPU. The layers ask `usable(x)` and keep
their torch code as the fallback, which is also the reference the kernels are tested
against."""

from __future__ import annotations

from typing import Any

import torch

DTYPES = (torch.float32, torch.bfloat16)
ops: Any = None  # the extension module, or None: use torch


def set_fused_backend(module: Any) -> None:
    global ops
    ops = module


def usable(x: torch.Tensor) -> bool:
    return ops is not None and x.device.type == "cpu" and x.dtype in DTYPES
