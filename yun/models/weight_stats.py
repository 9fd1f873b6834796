"""What a loaded model's weights are in memory: tensor types and bytes."""

from __future__ import annotations

from collections import Counter

import torch
from gguf import GGMLQuantizationType

from yun.layers.quant_linear import QuantWeight


def weight_types(model: torch.nn.Module) -> tuple[Counter[str], int]:
    """(tensor count per type, total bytes), shared tensors counted once."""
    kinds: Counter[str] = Counter()
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantWeight) and id(m) not in seen:
            seen.add(id(m))
            for i, q in enumerate(m.qtypes):
                kinds[GGMLQuantizationType(q).name] += 1
                total += m.part(i).nbytes
    for p in {id(p): p for p in model.parameters()}.values():
        kinds[str(p.dtype).removeprefix("torch.")] += 1
        total += p.numel() * p.element_size()
    return kinds, total


def weight_bytes(model: torch.nn.Module) -> int:
    return weight_types(model)[1]


def weight_summary(model: torch.nn.Module) -> str:
    """e.g. "Q4_1 x210, float32 x61, Q8_0 x1 (97 MB)"."""
    kinds, total = weight_types(model)
    shown = ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
    return f"{shown} ({total / 1e6:.0f} MB)"
