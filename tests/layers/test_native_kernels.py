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
        linear_mod.linear(torch.randn(1, 64), w.float())  # fp32 never goes native
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
