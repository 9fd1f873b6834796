"""Weights that stay in a GGUF file's block format in memory, and the layers over them.

A `QuantTensor` is one GGUF tensor: its ggml type, its bytes as a uint8 matrix
[rows, row_bytes] (a view of the file's mapping until something reorders it) and its
logical shape [rows, cols]. A quantized `Linear` holds one per fused part (Q, K and V may
have different types in a Q4_K_M file) and multiplies by each in turn; the matmuls
themselves live in `yun.layers.quantized` (native kernels, or dequantize + F.linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from yun.layers import quantized
from yun.layers.linear import linear

# ggml types that are plain floats: these are loaded as ordinary dense tensors.
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # F32, F16, BF16


@dataclass
class QuantTensor:
    qtype: int  # gguf.GGMLQuantizationType value
    data: torch.Tensor  # uint8 [rows, row_bytes] (float types: their own dtype [rows, cols])
    shape: tuple[int, ...]  # logical shape in torch order, e.g. [out, in]
    name: str = ""  # the GGUF tensor name, for messages

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def dequantize(self) -> torch.Tensor:
        """The whole tensor in float32, in its logical shape."""
        if self.is_float:
            return self.data.float().reshape(self.shape)
        flat = self.data.reshape(-1, self.data.shape[-1])
        return quantized.dequantize(flat, self.qtype, self.cols).reshape(self.shape)

    def take_rows(self, index: torch.Tensor) -> "QuantTensor":
        """The rows `index` (a permutation or a subset), copied out of the mapping."""
        data = self.data.index_select(0, index.to(self.data.device))
        return QuantTensor(self.qtype, data, (int(index.numel()), *self.shape[1:]), self.name)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] -> [T, rows] in x's dtype."""
        return _part_matmul(x, self.data, self.qtype, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class QuantWeight(nn.Module):
    """The weight of one (possibly fused) linear layer: parts stacked along the output.

    The parts' bytes are buffers, so `.to(device)` moves them; they are not parameters
    (nothing trains them, and the dense-weight code paths never see them).
    """

    def __init__(self, parts: list[QuantTensor]):
        super().__init__()
        parts = _merge_same_type(parts)  # Q, K, V of one type: one matmul, no concat
        self.qtypes = [p.qtype for p in parts]
        self.cols = parts[0].cols
        self.out_sizes = [p.rows for p in parts]
        self.names = [p.name for p in parts]
        self._keys = [f"part{i}" for i in range(len(parts))]
        for key, p in zip(self._keys, parts):
            self.register_buffer(key, p.data, persistent=False)

    def part(self, i: int) -> QuantTensor:
        data = getattr(self, f"part{i}")
        return QuantTensor(self.qtypes[i], data, (self.out_sizes[i], self.cols), self.names[i])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] -> [T, sum(out_sizes)].

        The decode hot path (~120 calls per token on a small model): the buffers are read
        straight from `_buffers` (they follow `.to()`), no QuantTensor is built per call.
        """
        bufs = self._buffers
        if len(self._keys) == 1:
            return _part_matmul(x, bufs["part0"], self.qtypes[0], self.cols)
        outs = [_part_matmul(x, bufs[key], q, self.cols) for key, q in zip(self._keys, self.qtypes)]
        return torch.cat(outs, dim=-1)

    forward = matmul

    def extra_repr(self) -> str:
        return f"cols={self.cols}, parts={list(zip(self.names, self.out_sizes, self.qtypes))}"


def _part_matmul(x: torch.Tensor, data: torch.Tensor, qtype: int, cols: int) -> torch.Tensor:
    """x [T, cols] @ one part's weight.T -> [T, rows] in x's dtype."""
    if qtype in FLOAT_TYPES:
        if x.dim() == 2 and (data.dtype == torch.bfloat16
                             or data.dtype == x.dtype == torch.float32):  # the backend's
            return linear(x, data)
        return torch.nn.functional.linear(x, data.to(x.dtype))
    return quantized.quant_matmul(x, data, qtype, cols, None)


def _merge_same_type(parts: list[QuantTensor]) -> list[QuantTensor]:
    """Adjacent parts of one quantized type stacked into one (their rows concatenate)."""
    merged: list[QuantTensor] = []
    for p in parts:
        last = merged[-1] if merged else None
        if (last is not None and not p.is_float and last.qtype == p.qtype
                and last.data.shape[1:] == p.data.shape[1:] and len(p.shape) == 2):
            data = torch.cat([last.data, p.data])
            merged[-1] = QuantTensor(p.qtype, data, (data.shape[0], p.cols),
                                     f"{last.name}+{p.name}")
        else:
            merged.append(p)
    return merged


class QuantEmbedding(nn.Module):
    """Token embedding over a quantized [vocab, hidden] table: only looked-up rows are
    dequantized. `weight_q` is shared with a tied output head."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype):
        super().__init__()
        self.weight_q = weight
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, hidden] in the model's dtype."""
        t = self.weight_q.part(0)
        if t.is_float:
            return t.data.index_select(0, ids).to(self.dtype)
        rows = quantized.dequantize_rows(t.data, ids, t.qtype, t.cols)
        return rows.to(self.dtype)


class QuantLinear(nn.Module):
    """A (fused) linear layer whose weight stays quantized: y = x W^T + b.

    Replaces a loaded `Linear` / `MergedLinear`; keeps its bias and `output_sizes`.
    """

    def __init__(self, weight: QuantWeight, bias: nn.Parameter | None,
                 output_sizes: list[int] | None = None):
        super().__init__()
        self.qweight = weight
        self.bias = bias
        self.in_features = weight.cols
        self.out_features = sum(weight.out_sizes)
        self.output_sizes = list(output_sizes or [self.out_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x)  # [T, out] (no module call: nothing hooks the weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)
