"""Quantized GGUF weights: dequantize, embedding rows and matmuls.

A quantized weight arrives as the GGUF reader holds it: `data` [N, row_bytes] uint8 (N =
output features; each row is K / block_size blocks in ggml's byte layout), its
`gguf.GGMLQuantizationType` value and K (input features). It stays quantized in memory.

`dequantize` is pure torch (CPU or CUDA) and bit-exact with `gguf.quants.dequantize`: the
same float32 operations in the same order, per type. `quant_matmul` uses the native kernels
(yun/kernels/quant.cpp: activations quantized to int16 or int8 blocks, integer dot products
against the quantized weights) when the current backend holds them (`Backend.quant`,
yun/layers/backend.py), and dequantize + F.linear in float32 otherwise.

The native kernels serve every M: on Zen 4 (one thread, 896x4864) their int8 products run
at ~120 GFLOP/s for M = 16..512 against ~90 for torch's fp32 matmul on an already
dequantized weight, and ~70 when the dequantization is paid per call
(scripts/bench_quant.py).

int16 activations are the default: on SmolLM2-135M-Instruct Q4_1 (Zen 4, one thread) they
agree with the exact fp32 path on 221/221 teacher-forced top-1 tokens (int8: 0.977, and a
wrong greedy answer to "What is the capital of France?", as llama.cpp gives) at the same
perplexity, for ~6% of decode speed (median of interleaved runs; the kernels alone 13-20%
slower at M = 1).
"""

from __future__ import annotations

from typing import Callable

import gguf
import torch
import torch.nn.functional as F

from yun.layers.backend import ACTIVATIONS, current

__all__ = ["ACTIVATIONS", "block_info", "dequantize", "dequantize_rows", "quant_matmul",
           "supported_qtypes"]

QT = gguf.GGMLQuantizationType
QK_K = 256  # values per K-quant super-block

Dequant = Callable[[torch.Tensor], torch.Tensor]  # blocks [B, type_size] u8 -> [B, block] f32


def block_info(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a supported type."""
    return gguf.GGML_QUANT_SIZES[_check_qtype(qtype)]


def supported_qtypes() -> tuple[int, ...]:
    return tuple(int(t) for t in _DEQUANT)


def _check_qtype(qtype: int) -> QT:
    try:
        t = QT(int(qtype))
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    if t not in _DEQUANT:
        names = ", ".join(QT(q).name for q in _DEQUANT)
        raise ValueError(f"quantized type {t.name} ({int(t)}) is not supported here "
                         f"(supported: {names})")
    return t


def _check_data(data: torch.Tensor, qtype: int, k: int) -> tuple[int, int]:
    """Validates data [N, row_bytes] for (qtype, k); returns (block_size, type_size)."""
    t = _check_qtype(qtype)
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    if k <= 0 or k % bs:
        raise ValueError(f"{t.name}: K={k} is not a positive multiple of the block size {bs}")
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"{t.name}: data must be a 2-D uint8 tensor [N, row_bytes], "
                         f"got {data.dtype} {tuple(data.shape)}")
    if data.shape[1] != k // bs * ts:
        raise ValueError(f"{t.name}: K={k} needs {k // bs * ts} bytes per row, "
                         f"data has {data.shape[1]}")
    return bs, ts


# --- per-type dequantization (each mirrors gguf-py's numpy code, op for op) ---------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] bytes -> [B, 1] float32 (little-endian IEEE half)."""
    return b.contiguous().view(torch.float16).float()


# torch's uint8 shifts by a broadcast tensor, and its bit expansions, are slow (0.2-0.6 G
# values/s): nibbles and 2-bit fields are stacked from scalar shifts (5x faster), bits come
# from a [256, 8] table (2-4x faster). Integer steps only: the float ones stay gguf-py's.

def _split4(q: torch.Tensor, dim: int) -> torch.Tensor:
    """The low and high nibbles of q, stacked at `dim`."""
    return torch.stack((q & 0x0F, q >> 4), dim=dim)


def _split2(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Bits 0-1, 2-3, 4-5, 6-7 of q, stacked at `dim`."""
    return torch.stack((q & 3, (q >> 2) & 3, (q >> 4) & 3, q >> 6), dim=dim)


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bits(q: torch.Tensor) -> torch.Tensor:
    """q [...] uint8 -> [..., 8]: bit i at index i."""
    table = _BIT_TABLES.get(q.device)
    if table is None:
        table = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.uint8)
        table = _BIT_TABLES.setdefault(q.device, table.to(q.device))
    return table.index_select(0, q.reshape(-1).int()).reshape(*q.shape, 8)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """qs [B, n*width] -> [B, n, 2, width]: low nibbles, then high, per run of `width` bytes."""
    return _split4(qs.reshape(qs.shape[0], -1, width), dim=2)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """qh [B, 4] (a little-endian uint32) -> [B, 32]: bit i of the word at column i."""
    return _bits(qh).reshape(qh.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return d * q + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    ql = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = (ql | (_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    ql = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    q = (ql | (_bits32(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """2-bit fields: qs [B, 64] -> [B, 16, 16]; value 128i + 32j + l = qs[32i + l] >> 2j."""
    return _split2(qs.reshape(qs.shape[0], 2, 32), dim=2).reshape(qs.shape[0], 16, 16)


def _high_bits(qh: torch.Tensor, groups: int) -> torch.Tensor:
    """qh [B, 32] -> [B, groups, 256 / groups]: value 32j + l takes bit j of qh[l]."""
    return _bits(qh).transpose(1, 2).reshape(qh.shape[0], groups, -1)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    return (dl * _crumbs(qs).float() - ml).reshape(n, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales [B, 16] float32 (low nibbles, then 2-bit highs)."""
    n = s.shape[0]
    low = _nibbles(s[:, :8], 8).reshape(n, 16)
    high = _split2(s[:, 8:12], dim=1)  # [B, 4 shifts, 4 bytes]
    sc = low | (high.reshape(n, 16) << 4)
    return (sc.to(torch.int8) - 32).float()


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, d = b[:, :32], b[:, 32:96], _f16(b[:, 108:110])
    dl = (d * _q3_k_scales(b[:, 96:108])).reshape(n, 16, 1)
    qh = _high_bits(hmask, 16) ^ 1  # a set bit means no -4 offset
    q = (_crumbs(qs).to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [B, 8] uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_affine(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k4_affine(b)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k4_affine(b)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    q = (ql | (_high_bits(b[:, 16:48], 8) << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    lo = _nibbles(ql, 64).reshape(n, 8, 32)
    hi = _split2(qh.reshape(n, 2, 32), dim=2)  # [B, 2, 4, 32]
    q = (lo | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


_DEQUANT: dict[QT, Dequant] = {
    QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}

_PIECE_VALUES = 1 << 18  # values per piece: temporaries stay in cache (a fresh 8 MB one page-
# faults on every op: 0.07 vs 0.8 G values/s for Q4_K, measured)


def dequantize(data: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """data [N, row_bytes] uint8 -> [N, k] float32, bit-exact with gguf.quants.dequantize."""
    bs, ts = _check_data(data, qtype, k)
    fn = _DEQUANT[QT(int(qtype))]
    n = data.shape[0]
    out = torch.empty(n, k, dtype=torch.float32, device=data.device)  # [N, K]
    rows = max(1, _PIECE_VALUES // k)
    for r0 in range(0, n, rows):
        piece = data[r0:r0 + rows]
        blocks = piece.reshape(-1, ts)  # [rows * K / bs, type_size]
        out[r0:r0 + rows] = fn(blocks).reshape(piece.shape[0], k)
    return out


def dequantize_rows(data: torch.Tensor, rows: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Only the rows asked (an embedding lookup): rows [R] int64 -> [R, k] float32."""
    _check_data(data, qtype, k)
    return dequantize(data.index_select(0, rows.to(device=data.device, dtype=torch.long)),
                      qtype, k)


# --- matmul dispatch ------------------------------------------------------------------------

def quant_matmul(x: torch.Tensor, data: torch.Tensor, qtype: int, k: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] (float32 or bfloat16) @ W.T (+ bias) -> [..., N] in x's dtype.

    With the native backend, x is quantized to int16 (or int8) blocks of 32 first, one
    scale each: the result differs from the float32 product by ~1e-5 (int8: ~5e-3)
    relative (see the tests). From `QuantKernels.many_rows_from` rows the weight is
    dequantized once per call for a GEMM (`QuantKernels.many_rows`): on a CPU with fast
    bf16 products to bf16, with x rounded to bf16 (~2e-3 relative per value); elsewhere to
    float32, for torch's float32 GEMM (the exact weights, x as it is).
    """
    backend = current().quant
    if (backend is not None and qtype in _NATIVE and x.device.type == "cpu"
            and data.device.type == "cpu"):
        # Decode calls this ~7 times per layer per token: the kernel validates the shapes
        # itself, and only a failure pays for the checks that name the problem.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # [M, K]
        try:
            if backend.many_rows is not None and x2.shape[0] >= backend.many_rows_from:
                y = backend.many_rows(backend.module, x2, data, qtype, k, bias,
                                      backend.isa)  # float32
            else:
                y = backend.module.matmul(x2, data, qtype, k, bias, backend.isa,
                                          backend.activations)
        except RuntimeError:
            _check_matmul(x, data, qtype, k)
            raise
        if y.dtype != x.dtype:  # float16 etc.: computed from float32, returned as x's dtype
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
    _check_matmul(x, data, qtype, k)
    w = dequantize(data, qtype, k)  # [N, K] float32
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def _check_matmul(x: torch.Tensor, data: torch.Tensor, qtype: int, k: int) -> None:
    _check_data(data, qtype, k)
    if x.shape[-1] != k:
        raise ValueError(f"{QT(int(qtype)).name}: x has {x.shape[-1]} features, "
                         f"the weight expects K={k}")


_NATIVE = frozenset(int(t) for t in _DEQUANT)  # the types yun/kernels/quant.cpp runs
