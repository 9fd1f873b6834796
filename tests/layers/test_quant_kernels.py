"""Quantized GGUF weights: the pure-torch dequantization against gguf-py's (bit for bit), the
native integer kernels against float64 references, and the dispatch between them."""

from __future__ import annotations

import functools
import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from yun.layers import quantized as qmod
from yun.layers.backend import TORCH, Backend, QuantKernels, current, use_backend
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
    data = torch.from_numpy(random_weight(QT.Q5_1, 12, 64))
    x, b = torch.randn(3, 64), torch.randn(12)
    w = dequantize(data, QT.Q5_1, 64)
    assert torch.equal(qmod.quant_matmul(x, data, QT.Q5_1, 64, b), torch.nn.functional.linear(x, w, b))
    y = qmod.quant_matmul(x.bfloat16(), data, QT.Q5_1, 64)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 12)
    assert current().quant_name == "torch"  # outside any engine


# --- native kernels ---------------------------------------------------------------------------

from yun import kernels  # noqa: E402
from yun.kernels import cpu  # noqa: E402

native = kernels.quant()
needs_native = pytest.mark.skipif(native is None, reason="no compiler here")
PATHS = list(native.isas()) if native is not None else []

# Shapes: N not a multiple of the 4-row pass or the 16/64-row tiles; K with a partial last
# chunk for blocks of 32 (224 = 7 blocks, 896 = 3.5 chunks), two or three chunks for K-quants.
SHAPES_32 = [(1, 37, 224), (3, 21, 896), (7, 6, 64), (33, 70, 288)]
SHAPES_256 = [(1, 37, 512), (3, 21, 768), (7, 6, 256), (33, 70, 512)]


def shapes(qtype: QT) -> list[tuple[int, int, int]]:
    return SHAPES_32 if block_info(qtype)[0] == 32 else SHAPES_256


def reference(x: torch.Tensor, data: np.ndarray, qtype: QT, bias: torch.Tensor | None,
              isa: str, activations: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """float64 products of the dequantized weight with x itself, and with x as the kernels
    quantize it (int8 or int16 blocks of 32, one scale each): the second is what they
    compute."""
    k = x.shape[1]
    w = torch.from_numpy(gguf_dequantize(data, qtype)).double()  # [N, K]
    q, d = native.quantize_activation(x, k, isa, activations)
    x_hat = q[:, :k].double() * d.double().repeat_interleave(32, dim=1)[:, :k]
    b = 0 if bias is None else bias.double()
    return x.double() @ w.T + b, x_hat @ w.T + b


@needs_native
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_native_matmul_matches_float64_references(qtype, isa):
    for i, (m, n, k) in enumerate(shapes(qtype)):
        data = random_weight(qtype, n, k, seed=i)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g) if i % 2 else None
        y = native.matmul(x, torch.from_numpy(data), int(qtype), k, bias, isa)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        exact, of_quantized_x = reference(x, data, qtype, bias, isa)
        scale = of_quantized_x.abs().max().item()
        # Against what the kernel computes: only float32 rounding (sums of a few hundred
        # products: ~1e-6 relative); a wrong scale, group or offset is off by >1e-2.
        err = (y.double() - of_quantized_x).abs().max().item()
        assert err <= 2e-5 * scale, (qtype.name, isa, m, n, k, err, scale)
        # Against x itself: int8 blocks of 32 with d = max|x| / 127 round each value by up
        # to d / 2, ~0.5% of the product's norm for gaussian x (measured 4-8e-3); 2% bound.
        rel = ((y.double() - exact).norm() / exact.norm()).item()
        assert rel <= 2e-2, (qtype.name, isa, m, n, k, rel)


@needs_native
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_int16_activations_match_the_float64_product_of_x_itself(qtype, isa):
    for i, (m, n, k) in enumerate(shapes(qtype) + [(2, 5, 32 * block_info(qtype)[0])]):
        data = random_weight(qtype, n, k, seed=i)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)  # blocks of all scales
        bias = torch.randn(n, generator=g) if i % 2 else None
        y = native.matmul(x, torch.from_numpy(data), int(qtype), k, bias, isa, "int16")
        assert y.dtype == torch.float32 and y.shape == (m, n)
        exact, of_quantized_x = reference(x, data, qtype, bias, isa, "int16")
        scale = exact.abs().max().item()
        # What the kernel computes (x in int16 blocks): float32 rounding only, as for int8.
        assert (y.double() - of_quantized_x).abs().max().item() <= 2e-5 * scale
        # Against x itself (not its int8 rounding): d = max|x| / 32767 rounds each value by
        # up to d / 2, a uniform error of std ~ 2.5 sigma / 32767 / sqrt(12) ~ 2e-5 of the
        # block's size (gaussian blocks of 32: max ~ 2.5 sigma), so ~2e-5 of the product's
        # norm, plus ~1e-6 of float32 sums. 1e-4 is 5x that, and 40x below int8's ~4e-3.
        rel = ((y.double() - exact).norm() / exact.norm()).item()
        assert rel <= 1e-4, (qtype.name, isa, m, n, k, rel)
        assert (y.double() - exact).abs().max().item() <= 1e-4 * scale, (qtype.name, isa, m, n, k)


@needs_native
@pytest.mark.parametrize("isa", PATHS)
def test_every_path_quantizes_the_activation_to_the_same_bits(isa):
    x = torch.randn(5, 896) * torch.logspace(-3, 3, 896)  # blocks of very different scales
    x[2, 64:96] = 0  # an all-zero block
    q, d = native.quantize_activation(x, 896, isa)
    q0, d0 = native.quantize_activation(x, 896, "scalar")
    assert torch.equal(q, q0) and torch.equal(d.view(torch.int32), d0.view(torch.int32))
    assert q.shape == (5, 1024) and q[:, 896:].abs().sum() == 0  # padded to whole chunks
    assert q.abs().max() == 127 and d[2, 2] == 0


@needs_native
@pytest.mark.parametrize("isa", PATHS)
def test_every_path_quantizes_the_activation_to_the_same_int16_bits(isa):
    x = torch.randn(5, 864) * torch.logspace(-3, 3, 864)  # 27 blocks: a half-filled 64
    x[2, 64:96] = 0  # an all-zero block
    q, d = native.quantize_activation(x, 864, isa, "int16")
    q0, d0 = native.quantize_activation(x, 864, "scalar", "int16")
    assert q.dtype == torch.int16 and torch.equal(q, q0)
    assert torch.equal(d.view(torch.int32), d0.view(torch.int32))
    assert q.shape == (5, 1024) and q[:, 864:].abs().sum() == 0  # padded to whole chunks
    assert q.abs().max() == 32767 and d[2, 2] == 0
    x_hat = q[:, :864].double() * d.double().repeat_interleave(32, dim=1)[:, :864]
    block_max = x.abs().reshape(5, 27, 32).amax(-1).double().repeat_interleave(32, dim=1)
    assert ((x_hat - x.double()).abs() <= block_max / 32767 * 0.51).all()  # round to nearest


@needs_native
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.Q8_0], ids=lambda t: t.name)
def test_partial_chunks_read_no_byte_past_their_row(qtype, isa):
    """The last row's partial chunk sits right before bytes that would poison the result
    (0xFF: nan half scales) if a kernel read them."""
    n, k = 9, 7 * 32
    good = random_weight(qtype, n, k)
    flat = np.full(good.size + 4096, 0xFF, dtype=np.uint8)
    flat[:good.size] = good.ravel()
    data = torch.from_numpy(flat)[:good.size].view(n, -1)
    x = torch.randn(2, k)
    y = native.matmul(x, data, int(qtype), k, None, isa)
    _, want = reference(x, good, qtype, None, isa)
    assert torch.isfinite(y).all()
    assert (y.double() - want).abs().max() <= 2e-5 * want.abs().max()


@needs_native
@pytest.mark.parametrize("activations", ["int16", "int8"])
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q6_K],
                         ids=lambda t: t.name)
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(qtype, isa, activations):
    """Batched decode and prefill (many rows: the kernels' many-row loops) give each row
    bit for bit what it gets alone (decode's one-row loop), partial chunks included, so a
    request's tokens do not depend on what it is batched with."""
    k = 896 if block_info(qtype)[0] == 32 else 768
    data = torch.from_numpy(random_weight(qtype, 45, k, seed=3))
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(45)
    alone = torch.cat([native.matmul(x[i:i + 1], data, int(qtype), k, bias, isa, activations)
                       for i in range(x.shape[0])])
    for m in (2, 4, 8, 13, 33):
        y = native.matmul(x[:m], data, int(qtype), k, bias, isa, activations)
        assert torch.equal(y, alone[:m]), (qtype.name, isa, activations, m)


@needs_native
@pytest.mark.parametrize("isa", PATHS)
def test_bfloat16_activations_give_bfloat16_outputs_of_the_same_product(isa):
    data = torch.from_numpy(random_weight(QT.Q4_K, 40, 512))
    x = torch.randn(3, 512).bfloat16()
    bias = torch.randn(40)
    y = native.matmul(x, data, int(QT.Q4_K), 512, bias, isa)
    want = native.matmul(x.float(), data, int(QT.Q4_K), 512, bias, isa)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, want.bfloat16())  # one rounding of the same float32 result


@needs_native
def test_an_inf_or_nan_in_x_makes_only_its_rows_outputs_nan():
    data = torch.from_numpy(random_weight(QT.Q8_0, 10, 64))
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    for isa in PATHS:
        for activations in ("int8", "int16"):
            y = native.matmul(x, data, int(QT.Q8_0), 64, None, isa, activations)
            assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all(), isa


@needs_native
def test_native_kernel_rejects_bad_inputs():
    data = torch.from_numpy(random_weight(QT.Q4_0, 4, 64))
    with pytest.raises(RuntimeError, match="bytes per row"):
        native.matmul(torch.randn(1, 96), data, int(QT.Q4_0), 96, None, "scalar")
    with pytest.raises(RuntimeError, match="unknown quantized matmul path"):
        native.matmul(torch.randn(1, 64), data, int(QT.Q4_0), 64, None, "avx9000")
    with pytest.raises(RuntimeError, match="no native kernel"):
        native.matmul(torch.randn(1, 64), data, int(QT.F16), 64, None, "scalar")
    with pytest.raises(RuntimeError, match="unknown activation mode 'int4'"):
        native.matmul(torch.randn(1, 64), data, int(QT.Q4_0), 64, None, "scalar", "int4")


# --- dispatch ---------------------------------------------------------------------------------

class Spy:
    """The extension module, recording which path each matmul took."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def isas(self):
        return self.module.isas()

    def matmul(self, x, w, qtype, k, bias, isa, activations):
        self.calls.append((isa, activations, tuple(x.shape)))
        return self.module.matmul(x, w, qtype, k, bias, isa, activations)


def quant_backend(module, **how) -> Backend:
    return Backend(quant=QuantKernels.choose(module, **how))


@needs_native
@pytest.mark.parametrize("isa", PATHS)
def test_a_backend_forces_each_path_and_none_falls_back_to_torch(isa):
    data = torch.from_numpy(random_weight(QT.Q6_K, 24, 256))
    x = torch.randn(2, 3, 256)  # leading dims are kept
    bias = torch.randn(24)
    spy = Spy(native)
    backend = quant_backend(spy, isa=isa, activations="int8")
    assert backend.quant_name == f"{isa}/int8"
    with use_backend(backend):
        y = qmod.quant_matmul(x, data, QT.Q6_K, 256, bias)
    assert spy.calls == [(isa, "int8", (6, 256))] and y.shape == (2, 3, 24)
    w = dequantize(data, QT.Q6_K, 256)
    want = torch.nn.functional.linear(x, w, bias)
    assert ((y - want).norm() / want.norm()).item() <= 2e-2
    assert current().quant_name == "torch"  # left the with: nothing stays installed
    assert torch.equal(qmod.quant_matmul(x, data, QT.Q6_K, 256, bias), want)
    with use_backend(TORCH):
        assert torch.equal(qmod.quant_matmul(x, data, QT.Q6_K, 256, bias), want)
    assert len(spy.calls) == 1


@needs_native
def test_default_backend_path_is_the_best_this_cpu_runs():
    assert quant_backend(native).quant_name == f"{PATHS[0]}/{qmod.ACTIVATIONS[0]}"
    if cpu.cpu_features() or PATHS == ["scalar"]:  # /proc/cpuinfo readable
        assert cpu.quant_path() == PATHS[0]
    assert cpu.describe(PATHS[0]).endswith(f"quantized matmul: {PATHS[0]}")
    with pytest.raises(ValueError, match="cannot run on this CPU"):
        quant_backend(native, isa="avx9000")


@needs_native
def test_a_backend_passes_its_activation_mode_and_rejects_unknown_ones():
    spy = Spy(native)
    with use_backend(quant_backend(spy)):
        qmod.quant_matmul(torch.randn(1, 32), torch.from_numpy(random_weight(QT.Q8_0, 3, 32)),
                          QT.Q8_0, 32)
    assert spy.calls == [(PATHS[0], qmod.ACTIVATIONS[0], (1, 32))]
    with pytest.raises(ValueError, match="activations must be one of int16, int8, got 'fp8'"):
        quant_backend(native, activations="fp8")


@needs_native
def test_native_backend_is_used_only_for_cpu_tensors():
    spy = Spy(native)
    data = torch.from_numpy(random_weight(QT.Q8_0, 8, 32))
    with use_backend(quant_backend(spy)):
        qmod.quant_matmul(torch.randn(1, 32), data, QT.Q8_0, 32)
        assert len(spy.calls) == 1
        with pytest.raises(ValueError, match="K=32"):
            qmod.quant_matmul(torch.randn(1, 64), data, QT.Q8_0, 32)


def test_paths_by_cpu_features():
    assert cpu.quant_path(frozenset()) == "scalar"
    assert cpu.quant_path(frozenset({"avx2", "fma", "f16c"})) == "avx2"
    assert cpu.quant_path(frozenset({"avx2", "fma", "f16c", "avx_vnni"})) == "avx2-vnni"
    avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}
    assert cpu.quant_path(frozenset(avx512)) == "avx512"
    assert cpu.quant_path(frozenset(avx512 | {"avx512_vnni"})) == "avx512-vnni"
    assert cpu.quant_path(frozenset({"neon", "asimddp"})) == "scalar"
    assert cpu._amd_core(25, 17) == "Zen 4" and cpu._amd_core(25, 1) == "Zen 3"
    assert cpu._amd_core(26, 2) == "Zen 5" and cpu._amd_core(23, 49) == "Zen 2"


def test_quant_accessor_logs_and_returns_none_when_the_build_fails(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise OSError("no c++ compiler")

    monkeypatch.setattr(kernels, "_load_locked", no_compiler)
    kernels.quant.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="yun.kernels"):
            assert kernels.quant() is None
        assert "native quantized kernels unavailable (no c++ compiler)" in caplog.text
    finally:
        kernels.quant.cache_clear()


# --- many rows: the weight dequantized to bf16, then a bf16 GEMM --------------------------

@needs_native
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_native_dequantize_bf16_is_the_reference_rounded_once(qtype):
    """The many-row path's weight: the float32 dequantization (gguf-py's, bit-exact with
    yun's torch one) rounded once to bf16; partial last chunks included."""
    for i, (_, n, k) in enumerate(shapes(qtype)):
        data = random_weight(qtype, n, k, seed=10 + i)
        got = native.dequantize_bf16(torch.from_numpy(data), qtype, k)
        assert got.dtype == torch.bfloat16 and got.shape == (n, k)
        want = torch.from_numpy(gguf_dequantize(data, qtype)).bfloat16()
        # K-quants' scales multiply in another order than gguf-py's: an fp32 ulp apart,
        # which may move a bf16 rounding by one ulp (2^-8 relative) in rare values.
        close = (got.float() - want.float()).abs() <= want.float().abs() * 2 ** -8
        assert close.all(), (qtype.name, n, k)
        assert (got == want).float().mean() >= 0.999, (qtype.name, n, k)


# Byte offsets of the fp16 fields of blocks of 32 (d, and m for the _1 types).
_F16_FIELDS_32 = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,)}


@needs_native
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_native_dequantize_f32_is_the_reference_within_an_ulp(qtype):
    """The fp32 many-row path's weight (CPUs without fast bf16 products): the kernels'
    affine map a * v + c, against gguf-py's d * (q - offset): within 2 fp32 ulps of each
    value's scale, and bfloat16's dequantization is exactly it rounded once."""
    for i, (_, n, k) in enumerate(shapes(qtype)):
        data = torch.from_numpy(random_weight(qtype, n, k, seed=20 + i))
        got = native.dequantize_f32(data, qtype, k)
        assert got.dtype == torch.float32 and got.shape == (n, k)
        want = torch.from_numpy(gguf_dequantize(data.numpy(), qtype))
        scale = want.abs().amax(dim=1, keepdim=True)
        assert ((got - want).abs() <= scale * 2 ** -22).all(), (qtype.name, n, k)
        assert torch.equal(got.bfloat16(), native.dequantize_bf16(data, qtype, k))


@needs_native
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_gives_the_same_bits_on_every_path(qtype):
    """The SIMD paths' vector dequantization (bf16 and fp32) against the scalar loop, bit
    for bit: raw random blocks (every quant bit pattern, Q8_0's -128 included), scales of
    both signs and some zero (the sign of a zero product), partial last chunks."""
    rng = np.random.default_rng(int(qtype))
    bs, ts = block_info(qtype)
    fields = _F16_FIELDS_32.get(qtype) or _F16_FIELDS[qtype]
    for n, k in [(5, 224), (17, 896), (3, 64), (40, 576)] if bs == 32 else [(5, 256), (19, 768)]:
        blocks = rng.integers(0, 256, size=(n, k // bs, ts), dtype=np.uint8)
        for off in fields:
            scale = rng.uniform(-1e-2, 1e-2, size=(n, k // bs)).astype(np.float16)
            scale[rng.random(scale.shape) < 0.05] = 0
            blocks[:, :, off:off + 2] = scale.view(np.uint8).reshape(n, k // bs, 2)
        data = torch.from_numpy(blocks.reshape(n, -1))
        want = native.dequantize_bf16(data, qtype, k, "scalar")
        want32 = native.dequantize_f32(data, qtype, k, "scalar")
        for path in [*PATHS, ""]:  # "": the best path this CPU runs
            got = native.dequantize_bf16(data, qtype, k, path)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (path, n, k)
            got = native.dequantize_f32(data, qtype, k, path)
            assert torch.equal(got.view(torch.int32), want32.view(torch.int32)), (path, n, k)
    with pytest.raises(RuntimeError, match="unknown quantized matmul path"):
        native.dequantize_bf16(data, qtype, k, "avx1024")


def _reference_bf16_gemm(x, w, b):  # what a bf16 GEMM computes, on any CPU
    return torch.nn.functional.linear(x.bfloat16().float(), w.float(), b)


@needs_native
@pytest.mark.parametrize("start", sorted({kernels.AMX_MANY_ROWS_FROM, kernels.DOT_MANY_ROWS_FROM, 128}))
def test_many_rows_take_the_bf16_gemm_from_the_threshold(start):
    calls = []
    fast = kernels.quant_many_rows_dtype() == torch.bfloat16  # this CPU has a bf16 GEMM
    many = kernels.quant_many_rows() if fast else functools.partial(
        kernels._bf16_many_rows, _reference_bf16_gemm)

    def spy(module, x, data, qtype, k, b, isa):
        calls.append((x.shape[0], isa))
        return many(module, x, data, qtype, k, b, isa)

    qtype, n, k = QT.Q4_K, 40, 512
    data = torch.from_numpy(random_weight(qtype, n, k, seed=3))
    bias = torch.randn(n)
    w64 = torch.from_numpy(gguf_dequantize(data.numpy(), qtype)).double()
    quant = QuantKernels.choose(native, many_rows=spy, many_rows_from=start)
    assert quant.name.endswith(f", >= {start} rows: bf16")
    with use_backend(Backend(quant=quant)):
        for rows in (start - 1, start, 300):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            y = qmod.quant_matmul(x, data, qtype, k, bias)
            assert y.dtype == torch.float32 and y.shape == (rows, n)
            want = x.double() @ w64.T + bias.double()
            scale = (x.double().abs() @ w64.abs().T).max()
            # bf16 rounding of x and of w: ~2^-9 relative each, summed over K products
            assert (y.double() - want).abs().max() <= 2 ** -7 * scale
    assert calls == [(start, PATHS[0]), (300, PATHS[0])]
    with pytest.raises(ValueError, match="many_rows_from"):
        QuantKernels.choose(native, many_rows=spy)  # a many-row path needs its threshold


@needs_native
def test_many_rows_take_the_fp32_gemm_on_the_exact_weight():
    """CPUs without fast bf16 products: from the threshold on, the weight is dequantized to
    float32 (the native kernels' map) and x stays as it is: float32 GEMM accuracy, far
    below the int16 kernels' rounding of x."""
    calls = []

    def spy(module, x, data, qtype, k, b, isa):
        calls.append(x.shape[0])
        return kernels._f32_many_rows(module, x, data, qtype, k, b, isa)

    qtype, n, k = QT.Q5_0, 24, 224
    data = torch.from_numpy(random_weight(qtype, n, k, seed=4))
    bias = torch.randn(n)
    w64 = torch.from_numpy(gguf_dequantize(data.numpy(), qtype)).double()
    quant = QuantKernels.choose(native, many_rows=spy, many_rows_from=16,
                                many_rows_dtype=torch.float32)
    assert quant.name.endswith(", >= 16 rows: fp32")
    with use_backend(Backend(quant=quant)):
        for rows in (15, 16, 40):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            y = qmod.quant_matmul(x, data, qtype, k, bias)
            want = x.double() @ w64.T + bias.double()
            err = ((y.double() - want).abs().max() / want.abs().max()).item()
            assert err <= (1e-3 if rows < 16 else 1e-5), (rows, err)  # int16 x, or exact x
        y16 = qmod.quant_matmul(torch.randn(16, k).bfloat16(), data, qtype, k)
        assert y16.dtype == torch.bfloat16  # x's dtype back
    assert calls == [16, 40, 16]
    with pytest.raises(ValueError, match="many_rows_dtype"):
        QuantKernels.choose(native, many_rows=spy, many_rows_from=4,
                            many_rows_dtype=torch.float16)


@needs_native
@pytest.mark.parametrize("qtype,n,k", [(QT.Q8_0, 3001, 96), (QT.Q6_K, 77, 512),
                                       (QT.Q4_1, 5, 4096)], ids=lambda v: str(v))
def test_tiled_fp32_matmul_is_f_linear_on_the_dequantized_weight(qtype, n, k):
    """matmul_dequant_f32 dequantizes cache-sized tiles of rows (many tiles for a tall W
    and a last short one, one tile for a short one) on every path: F.linear's result on
    the whole fp32 weight, to float32 rounding, with and without a bias; x in bf16 too."""
    data = torch.from_numpy(random_weight(qtype, n, k, seed=n))
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(k))
    bias = torch.randn(n)
    w = native.dequantize_f32(data, qtype, k)
    for b in (None, bias):
        want = torch.nn.functional.linear(x, w, b)
        for path in PATHS:
            got = native.matmul_dequant_f32(x, data, qtype, k, b, path)
            assert got.dtype == torch.float32 and got.shape == (19, n)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    got = native.matmul_dequant_f32(x.bfloat16(), data, qtype, k, None)
    torch.testing.assert_close(got, torch.nn.functional.linear(x.bfloat16().float(), w),
                               rtol=1e-5, atol=1e-4)
    with torch.inference_mode():  # as in an engine: y is an inference tensor on every thread
        x_inf, bias_inf = x.clone(), bias.clone()
        got = native.matmul_dequant_f32(x_inf, data, qtype, k, bias_inf)
        assert got.is_inference()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), rtol=1e-5,
                               atol=1e-4)
    with pytest.raises(RuntimeError, match="bias must have N"):
        native.matmul_dequant_f32(x, data, qtype, k, torch.randn(n + 1))


def test_many_row_path_is_chosen_by_the_cpus_bf16_hardware():
    base = frozenset({"avx512f", "avx512bw", "avx512vl", "fma", "avx2", "f16c"})
    # No fast bf16: torch's fp32 GEMM on the fp32 weight, from the quantized path's threshold
    assert kernels.quant_many_rows(features=base) is kernels._f32_many_rows
    assert kernels.quant_many_rows_dtype(base) == torch.float32
    for feats, path in ((base, "avx512"), (base | {"avx512_vnni"}, "avx512-vnni"),
                        (frozenset({"avx2", "fma", "f16c"}), "avx2"),
                        (frozenset({"avx2", "fma", "f16c", "avx_vnni"}), "avx2-vnni"),
                        (frozenset(), "scalar")):
        assert kernels.quant_many_rows_from(feats) == kernels.FP32_MANY_ROWS_FROM[path]
    assert kernels.quant_many_rows_from(frozenset()) == 1  # the scalar kernels never pay
    amx = kernels.quant_many_rows(features=base | {"amx_bf16", "avx512_bf16"})
    assert amx.func is kernels._bf16_many_rows and amx.args == (kernels._amx_gemm,)
    assert kernels.quant_many_rows_dtype(base | {"amx_bf16"}) == torch.bfloat16
    assert kernels.quant_many_rows("avx2", features=base | {"avx512_bf16"}) \
        is kernels._f32_many_rows
    mod = kernels.native("avx512")
    if mod is not None and mod.gemm_bf16_has_dot() and native is not None:
        fn = kernels.quant_many_rows(features=base | {"avx512_bf16"})
        x, data = torch.randn(9, 64), torch.from_numpy(random_weight(QT.Q8_0, 5, 64))
        w = native.dequantize_bf16(data, QT.Q8_0, 64)
        assert torch.equal(fn(native, x, data, QT.Q8_0, 64, None, ""),
                           mod.gemm_bf16_kernel(x, w, None, "dot"))
    # AMX's threshold wins over vdpbf16ps's where a CPU has both
    assert kernels.quant_many_rows_from(base | {"amx_bf16", "avx512_bf16"}) \
        == kernels.AMX_MANY_ROWS_FROM
    assert kernels.quant_many_rows_from(base | {"avx512_bf16"}) == kernels.DOT_MANY_ROWS_FROM
