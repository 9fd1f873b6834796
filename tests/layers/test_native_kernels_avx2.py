"""The AVX2 build of the native kernels (yun/kernels/avx2/), forced on whatever CPU runs
the tests, against torch (their fallback and reference); the build dispatch rule; and a
tiny model's greedy tokens with the AVX2 kernels against torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from yun import kernels
from yun.layers import fused
from yun.layers.backend import TORCH, Backend, use_backend
from yun.layers.activation import silu_and_mul
from yun.layers.norm import RMSNorm
from yun.layers.rotary import apply_rope, apply_rope_

mod = kernels.native("avx2")
needs_avx2 = pytest.mark.skipif(mod is None, reason="no AVX2+FMA+F16C or no compiler here")

AVX512 = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"})
ZEN3 = frozenset({"avx2", "fma", "f16c"})


@pytest.mark.parametrize("features,isa,want", [
    (AVX512, None, "avx512"),
    (AVX512 | {"avx512_vnni", "avx512_bf16"}, None, "avx512"),
    (ZEN3, None, "avx2"),
    (ZEN3 | {"avx_vnni"}, None, "avx2"),
    (AVX512 - {"avx512bw"}, None, "avx2"),  # avx512f alone (Knights Landing) is not enough
    (ZEN3 - {"f16c"}, None, None),
    (ZEN3 - {"fma"}, None, None),
    (frozenset({"neon", "asimddp"}), None, None),
    (frozenset(), None, None),
    (AVX512, "avx2", "avx2"),  # forced: the AVX2 build on an AVX-512 CPU
    (AVX512, "avx512", "avx512"),
    (ZEN3, "avx512", None),  # a build the CPU cannot run: torch
    (ZEN3, "avx2", "avx2"),
])
def test_dispatch_picks_the_best_build_the_cpu_runs(features, isa, want):
    assert kernels.native_isa(features, isa) == want


def test_dispatch_rejects_an_unknown_build_name():
    with pytest.raises(ValueError, match="isa"):
        kernels.native_isa(AVX512, "avx3")


@needs_avx2
def test_forced_avx2_module_is_the_avx2_build():
    assert mod.isa == "avx2"
    assert kernels.bf16_gemv("avx2") is mod.gemv_bf16
    assert kernels.elementwise("avx2") is mod
    if kernels.native_isa() == "avx512":
        assert kernels.native() is not mod and kernels.native("avx512") is kernels.native()


@needs_avx2
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 13, 70])
@pytest.mark.parametrize("N,K", [(64, 896), (203, 37), (9, 4864), (130, 16), (17, 7),
                                 (1, 9), (33, 263), (16, 520)])
@pytest.mark.parametrize("kind", ["gemv_bf16", "gemm_bf16"])
def test_avx2_matmul_matches_float32_reference(M, N, K, kind):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    ref = x.float() @ w.float().T + b.float()
    fn = getattr(mod, kind)
    for bias in (b, None):
        y = fn(x, w, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        want = ref if bias is not None else ref - b.float()
        # One bf16 rounding of the fp32 result: within 1 ulp of bf16 (2^-8 relative).
        assert torch.allclose(y.float(), want, rtol=2 ** -7, atol=1e-2)
    # fp32 activations stay fp32 (the fp32 result, up to the order of the sum).
    y32 = fn(x.float(), w, b)
    assert y32.dtype == torch.float32
    assert torch.allclose(y32, ref, rtol=1e-5, atol=1e-5 * K ** 0.5)


@needs_avx2
def test_avx2_matmul_takes_float16_and_strided_x():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 72, generator=g).bfloat16()
    x = torch.randn(9, 144, generator=g)[:, ::2]  # not contiguous
    ref = x @ w.float().T
    for fn in (mod.gemv_bf16, mod.gemm_bf16):
        assert torch.allclose(fn(x, w, None), ref, rtol=1e-5, atol=1e-4)
        y16 = fn(x.half(), w, None)
        assert y16.dtype == torch.float16
        # gemv rounds through bf16 before float16, as the AVX-512 build does.
        assert torch.allclose(y16.float(), x.half().float() @ w.float().T, rtol=2 ** -7,
                              atol=1e-2)


@needs_avx2
def test_avx2_gemm_of_empty_shapes():
    w = torch.randn(5, 8).bfloat16()
    assert mod.gemm_bf16(torch.randn(0, 8).bfloat16(), w, None).shape == (0, 5)
    y = mod.gemm_bf16(torch.randn(3, 0).bfloat16(), torch.randn(5, 0).bfloat16(), None)
    assert y.shape == (3, 5) and not y.float().any()


@needs_avx2
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,KvH,D", [(14, 2, 64), (4, 4, 32), (4, 2, 128), (8, 1, 24), (6, 3, 20),
                                     (2, 1, 5)])
def test_avx2_paged_decode_attention_matches_sdpa_path(dtype, tol, H, KvH, D):
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
    for fn in (mod.paged_decode_attention, None):
        with use_backend(Backend(decode=fn)):
            outs.append(attention.paged_attention(q, k, k, cache.clone(), D ** -0.5, meta))
    assert (outs[0].float() - outs[1].float()).abs().max().item() <= tol


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's last place at b's magnitude."""
    eps = torch.finfo(a.dtype).eps
    return ((a.float() - b.float()).abs() / (b.float().abs() * eps + 1e-30)).max().item()


@pytest.fixture
def avx2_fused():
    with use_backend(Backend(fused=mod)):
        yield


DTYPES = [torch.float32, torch.bfloat16]


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (7, 64), (3, 5, 24), (2, 33), (4, 5), (1, 1)])
def test_avx2_rms_norm_matches_torch(avx2_fused, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(shape[-1], generator=g).to(dtype)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    got = norm(x)
    with use_backend(TORCH):
        want = norm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert ulps(got, want) <= 3.01  # the sum's order and rsqrt's rounding, then 2 roundings


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 4864), (5, 24), (3, 37), (2, 3)])
def test_avx2_silu_and_mul_matches_torch(avx2_fused, dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    x = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # saturating exp at both ends
    got = silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # exp's last bits may flip a rounding
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=1e-6)


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES)
def test_avx2_silu_equals_the_avx512_silu_lane_for_lane(dtype):
    avx512 = kernels.native("avx512")
    if avx512 is None:
        pytest.skip("no AVX-512 build here")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 2 * 1000, generator=g) * 30).to(dtype)  # exp's whole range, clamps
    assert torch.equal(mod.silu_and_mul(x), avx512.silu_and_mul(x))


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D", [(1, 14, 64), (9, 2, 128), (4, 3, 40), (3, 2, 6), (2, 5, 2)])
def test_avx2_rope_in_place_equals_torch_on_views(avx2_fused, dtype, T, H, D):
    g = torch.Generator().manual_seed(T * H * D)
    qkv = torch.randn(T, (H + 2) * D, generator=g).to(dtype)
    pos = torch.randint(0, 1000, (T,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(pos.float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
    q = qkv[:, :H * D].view(T, H, D)  # strided view, as in the attention layer
    want = apply_rope(q, cos, sin)
    rest = qkv[:, H * D:].clone()
    got = apply_rope_(q, cos, sin)
    assert got.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(qkv[:, H * D:], rest)  # neighbours (and tails' neighbours) untouched
    assert torch.equal(got, want)  # torch's op-by-op roundings: bit-identical


@needs_avx2
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_forced_avx2_engine_greedy_tokens_equal_torch_fallback(qwen2_path, dtype):
    from yun import LLM, SamplingParams

    prompts = [list(range(300, 340)), list(range(7, 19)), [5, 900, 33]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {}
    for isa in ("avx2", None):
        llm = LLM(qwen2_path, dtype=dtype, kv_cache_memory=4 * 2**20,
                  native_kernels=isa is not None, kernel_isa=isa or "auto",
                  max_num_batched_tokens=32)
        try:
            if isa is not None:  # the runner chose the AVX2 build, not the best one
                backend = llm.engine.runner.backend
                assert backend.fused is mod
                assert backend.decode is mod.paged_decode_attention
                assert (backend.bf16 == (mod.gemv_bf16, kernels.bf16_many_rows(mod.gemm_bf16))
                        if dtype == "bfloat16" else backend.bf16 is None)
                assert backend.f32 is mod.gemv_f32
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
            tokens[isa] = [o.outputs[0].token_ids for o in outs]
        finally:
            llm.shutdown()
    assert tokens["avx2"] == tokens[None]
