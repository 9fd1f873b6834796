"""The int8 KV cache's row format: each (token, head) row of D values is stored as D int8
values followed by their float32 scale (4 bytes), x ~= q * scale, symmetric, with
scale = max(|x|) / 127 over the row.

Why per token and head (not per block): rows are written one token at a time (every
decode step), so a row's scale is known when it is written and never changes; a block
scale would have to be fixed before its tokens are seen or the block re-quantized as it
fills, and blocks shared through the prefix cache would need it too. The cost is 4 bytes
per D values (6% at D = 64), and one multiply per key or value row in the kernels.

One tensor per layer keeps the cache plumbing (block tables, slots, `[2, NB, BS, KvH, *]`)
the same as a float cache's: `int8 [2, NB, BS, KvH, D + 4]`. The native decode kernels
(yun/kernels/paged_attention.cpp, decode_step.cpp and the AVX2 twins) read and write the
same rows; `quantize_rows` here and theirs agree bit for bit.

The fp8 cache (`--kv-cache-dtype fp8`) stores keys and values as float8 e4m3 (torch's
`float8_e4m3fn`: 4 exponent bits, 3 mantissa bits, largest finite value 448), with no
scale (as vLLM's fp8 cache without calibrated scales): D bytes per row, a quarter of
float32. Values are clamped to +-448 as they are written (e4m3fn has no infinity: a cast
out of range would give NaN). It is for CUDA, where torch's attention reads it directly
cast; on a CPU only the torch path reads it (the native kernels take float and int8 rows),
which is slower than int8 there.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # one float32 per row
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def head_dim_of(cache: torch.Tensor) -> int:
    """D of a cache `[..., D]` (float) or `[..., D + 4]` (int8)."""
    return cache.shape[-1] - (SCALE_BYTES if is_quantized(cache) else 0)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """x float -> float8 e4m3fn, saturated at +-448 (never NaN from a large value)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [..., D] float -> int8 [..., D + 4] rows (values, then the scale's bytes)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127.0  # [..., 1]
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D + 4] rows -> [..., D] in `dtype` (float rows are only cast)."""
    if not is_quantized(rows):
        return rows.to(dtype)
    d = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., d:].view(torch.float32)  # [..., 1]: a view, no copy
    return (rows[..., :d].float() * scale).to(dtype)
