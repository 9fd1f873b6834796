"""Quantized GGUF weights: the pure-torch dequantization against gguf-py's (bit for bit), the
native integer kernels against float64 references, and the dispatch between them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from yun.layers import quantized as qmod
from yun.layers.quantized import QT, block_info, dequantize, dequantize_rows

QUANTIZABLE = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]  # gguf-py can quantize these
K_QUANTS = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL = QUANTIZABLE + K_QUANTS
# Byte offsets of each K-quant block's fp16 scale fields (d, and dmin where there is one).
_F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2),
               QT.Q6_K: (208,)}


def random_weight(qtype: QT, n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, row_bytes] uint8 of a valid weight. gguf-py quantizes a gaussian matrix where it
    can; K-quant blocks are random bytes (every bit pattern of their quants and 6-bit scales
    is valid) with the fp16 scale fields set to small finite values of either sign."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        return gguf_quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    bs, ts = block_info(qtype)
    blocks = rng.integers(0, 256, size=(n, k // bs, ts), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-2, size=(n, k // bs)) * rng.choice([-1, 1], (n, k // bs))
        blocks[:, :, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(
            n, k // bs, 2)
    return blocks.reshape(n, -1)


def same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    return np.array_equal(a.numpy().view(np.int32), b.view(np.int32))


# --- pure-torch dequantization ---------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_torch_dequantize_is_bit_exact_with_gguf(qtype):
    bs, _ = block_info(qtype)
    for n, k in ((1, bs), (5, 3 * bs), (17, 4 * 256)):
        data = random_weight(qtype, n, k, seed=n)
        got = dequantize(torch.from_numpy(data), qtype, k)
        assert got.dtype == torch.float32 and got.shape == (n, k)
        assert same_bits(got, gguf_dequantize(data, qtype)), (qtype.name, n, k)


def test_dequantize_rows_takes_only_the_rows_asked():
    data = random_weight(QT.Q4_K, 9, 512)
    rows = torch.tensor([7, 0, 7, 3])
    got = dequantize_rows(torch.from_numpy(data), rows, QT.Q4_K, 512)
    assert same_bits(got, gguf_dequantize(data, QT.Q4_K)[rows.numpy()])


def test_dequantize_works_in_pieces_across_a_large_matrix(monkeypatch):
    monkeypatch.setattr(qmod, "_PIECE_VALUES", 3 * 64)  # 3 rows per piece: uneven last piece
    data = random_weight(QT.Q8_0, 10, 64)
    assert same_bits(dequantize(torch.from_numpy(data), QT.Q8_0, 64),
                     gguf_dequantize(data, QT.Q8_0))


def test_unsupported_types_and_bad_shapes_raise_value_errors_that_name_them():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        qmod.block_info(QT.IQ2_XXS)
    with pytest.raises(ValueError, match="F16"):
        dequantize(torch.zeros(2, 64, dtype=torch.uint8), QT.F16, 32)
    with pytest.raises(ValueError, match="unknown"):
        dequantize(torch.zeros(2, 64, dtype=torch.uint8), 9999, 32)
    with pytest.raises(ValueError, match="Q4_K.*multiple"):
        dequantize(torch.zeros(2, 144, dtype=torch.uint8), QT.Q4_K, 128)
    with pytest.raises(ValueError, match="Q8_0.*bytes per row"):
        dequantize(torch.zeros(2, 35, dtype=torch.uint8), QT.Q8_0, 32)
    assert set(qmod.supported_qtypes()) == {int(t) for t in ALL}
    assert block_info(QT.Q6_K) == gguf.GGML_QUANT_SIZES[QT.Q6_K]


def test_torch_fallback_matmul_is_dequantize_then_float32_linear():
    qmod.set_quant_backend(None)
    data = torch.from_numpy(random_weight(QT.Q5_1, 12, 64))
    x, b = torch.randn(3, 64), torch.randn(12)
    w = dequantize(data, QT.Q5_1, 64)
    assert torch.equal(qmod.quant_matmul(x, data, QT.Q5_1, 64, b), torch.nn.functional.linear(x, w, b))
    y = qmod.quant_matmul(x.bfloat16(), data, QT.Q5_1, 64)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 12)
    assert qmod.quant_backend_name() == "torch"
