"""The native bf16 skinny-matmul kernel against torch (its fallback), and the dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from yun import kernels
from yun.layers import linear as linear_mod
from yun.layers.backend import Backend, use_backend

gemv = kernels.bf16_gemv()
gemm = kernels.bf16_gemm()
needs_kernel = pytest.mark.skipif(gemv is None, reason="no AVX-512 or no compiler here")


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 70])
@pytest.mark.parametrize("N,K", [(64, 896), (203, 37), (9, 4864), (130, 16)])
@pytest.mark.parametrize("kind", ["gemv", "gemm"])
def test_kernel_matches_float32_reference(M, N, K, kind):
    g = torch.Generator().manual_seed(M * 1000 + N)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    ref = x.float() @ w.float().T + b.float()
    for bias in (b, None):
        y = (gemv if kind == "gemv" else gemm)(x, w, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        want = ref if bias is not None else ref - b.float()
        # One bf16 rounding of the fp32 result: within 1 ulp of bf16 (2^-8 relative).
        assert torch.allclose(y.float(), want, rtol=2 ** -7, atol=1e-2)


HAS_DOT = gemm is not None and kernels.native("avx512").gemm_bf16_has_dot()


@pytest.mark.skipif(not HAS_DOT, reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("M", [1, 5, 6, 7, 64])
@pytest.mark.parametrize("N,K", [(64, 896), (203, 37), (9, 1031), (130, 16), (65, 1),
                                 (70, 513)])
def test_bf16_dot_gemm_matches_float64_reference(M, N, K):
    """The vdpbf16ps micro-kernel (AVX512-BF16): bf16 x bf16 products are exact, the sums
    fp32, so it sits within fp32 rounding of the exact product, as the widening kernel
    does; odd K (a half-filled last pair), K past one panel (512), ragged N and M."""
    mod = kernels.native("avx512")
    g = torch.Generator().manual_seed(M * 7 + N * 3 + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g)
    ref = x.double() @ w.double().T
    tol = 4e-7 * K ** 0.5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    for kernel in ("dot", "widen"):
        y = mod.gemm_bf16_kernel(x.float(), w, b, kernel)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert ((y.double() - ref - b.double()).abs() <= tol).all(), kernel
    # auto: bf16 x takes the dot kernel (bit for bit), fp32 x the widening one.
    assert torch.equal(mod.gemm_bf16(x, w, None),
                       mod.gemm_bf16_kernel(x, w, None, "dot"))
    assert torch.equal(mod.gemm_bf16(x.float(), w, None),
                       mod.gemm_bf16_kernel(x.float(), w, None, "widen"))
    with pytest.raises(RuntimeError, match="auto, widen or dot"):
        mod.gemm_bf16_kernel(x, w, None, "amx")


F32_BUILDS = [isa for isa in kernels.ISAS if kernels.f32_gemv(isa) is not None]


@pytest.mark.skipif(not F32_BUILDS, reason="no native build runs on this CPU")
@pytest.mark.parametrize("isa", F32_BUILDS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("N,K", [(64, 896), (203, 37), (9, 4864), (130, 16), (17, 7), (1, 9),
                                 (33, 263)])
def test_f32_gemv_matches_float64_reference(isa, M, N, K):
    """The fp32-weight GEMV of each build this CPU runs: fp32 accumulation of an exact
    product (no rounding of x or w), so within fp32's rounding of a K-term sum."""
    gemv32 = kernels.f32_gemv(isa)
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    ref = x.double() @ w.double().T
    tol = 4e-7 * (x.double().abs() @ w.double().abs().T) + 1e-6  # ~K eps-sized roundings
    for bias in (b, None):
        y = gemv32(x, w, bias)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        want = ref + b.double() if bias is not None else ref
        assert ((y.double() - want).abs() <= tol * K ** 0.5).all()
    # bf16 activations: widened exactly, the result rounded once to bf16.
    yb = gemv32(x.bfloat16(), w, None)
    want = (x.bfloat16().double() @ w.double().T)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.double(), want, rtol=2 ** -7, atol=1e-2)
    with pytest.raises(RuntimeError, match="float32"):
        gemv32(x, w.bfloat16(), None)


@pytest.mark.skipif(not F32_BUILDS, reason="no native build runs on this CPU")
def test_dispatch_uses_the_f32_gemv_for_few_fp32_rows_only():
    calls = []
    gemv32 = kernels.f32_gemv()

    def spy(x, w, b):
        calls.append(x.shape[0])
        return gemv32(x, w, b)

    w, b = torch.randn(32, 64), torch.randn(32)
    n = linear_mod.SKINNY_MAX_ROWS
    with use_backend(Backend(f32=spy)):
        for rows in (1, n, n + 1):
            x = torch.randn(rows, 64)
            assert torch.allclose(linear_mod.linear(x, w, b), F.linear(x, w, b),
                                  rtol=1e-5, atol=1e-5)
        linear_mod.linear(torch.randn(1, 64), w.T.contiguous().T)  # strided w: torch
        assert calls == [1, n]
    linear_mod.linear(torch.randn(1, 64), w)  # outside any engine: torch
    assert calls == [1, n]


@needs_kernel
def test_dispatch_uses_kernel_for_few_bf16_rows_and_torch_otherwise(monkeypatch):
    calls = []

    def spy(name, fn):
        def run(x, w, b):
            calls.append((name, x.shape[0]))
            return fn(x, w, b)
        return run

    with use_backend(Backend(bf16=(spy("few", gemv), spy("many", gemm)))):
        w = torch.randn(32, 64).bfloat16()
        for rows in (1, linear_mod.SKINNY_MAX_ROWS, linear_mod.SKINNY_MAX_ROWS + 1):
            x = torch.randn(rows, 64).bfloat16()
            y = linear_mod.linear(x, w)
            assert torch.allclose(y.float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-2)
        linear_mod.linear(torch.randn(1, 64), w.float())  # fp32: not the bf16 kernels
        n = linear_mod.SKINNY_MAX_ROWS
        assert calls == [("few", 1), ("few", n), ("many", n + 1)]
    linear_mod.linear(torch.randn(1, 64).bfloat16(), w)  # outside: torch
    assert len(calls) == 3


@needs_kernel
def test_bf16_engine_logits_agree_with_and_without_native_kernels(qwen2_path):
    from tests.helpers import logits_in_chunks
    from yun import LLM

    ids = list(range(300, 340))
    logits = {}
    for native in (True, False):
        llm = LLM(qwen2_path, dtype="bfloat16", kv_cache_memory=4 * 2**20, native_kernels=native)
        logits[native] = logits_in_chunks(llm.engine, ids, [30] + [1] * 10)  # prefill + decode
    diff = (logits[True] - logits[False]).abs().max().item()
    scale = logits[False].abs().max().item()
    assert diff <= 0.02 * scale, (diff, scale)


decode_kernel = kernels.paged_decode_attention()


@pytest.mark.skipif(decode_kernel is None, reason="no AVX-512 or no compiler here")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,KvH,D", [(14, 2, 64), (4, 4, 32), (8, 1, 24)])
def test_paged_decode_kernel_matches_sdpa_path(dtype, tol, H, KvH, D):
    from yun.layers import attention
    from yun.layers.context import AttentionMetadata

    g = torch.Generator().manual_seed(H + D)
    NB, BS, B = 40, 16, 4
    cache = torch.randn(2, NB, BS, KvH, D, generator=g).to(dtype)
    lens = torch.tensor([1, 16, 17, 150])
    tables = torch.stack([torch.randperm(NB, generator=g)[:10] for _ in range(B)])
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, KvH, D, generator=g).to(dtype)
    slots = tables[torch.arange(B), (lens - 1) // BS] * BS + (lens - 1) % BS
    mask = (torch.arange(10 * BS)[None, :] < lens[:, None])[:, None, None, :]
    meta = AttentionMetadata(slots, B, tables, lens, mask)
    outs = []
    for fn in (decode_kernel, None):
        with use_backend(Backend(decode=fn)):
            outs.append(attention.paged_attention(q, k, k, cache.clone(), D ** -0.5, meta))
    assert (outs[0].float() - outs[1].float()).abs().max().item() <= tol


@needs_kernel
def test_a_stale_build_lock_left_by_a_killed_build_does_not_hang_a_start():
    import os
    import subprocess
    import sys

    path = kernels.build_dir()
    open(os.path.join(path, "lock"), "w").close()  # what a build killed half-way leaves
    code = "import sys; from yun import kernels; sys.exit(0 if kernels.native() else 1)"
    r = subprocess.run([sys.executable, "-c", code], timeout=600)
    assert r.returncode == 0
    assert not os.path.exists(os.path.join(path, "lock"))
