"""The composite decode-step ops (yun/kernels/decode_step.cpp) in each native build this
CPU runs: `qkv_attention`'s one-call decode path gives the same outputs and cache as the
separate native ops, and matches torch's path; `RMSNorm.add_forward` matches the add and
the norm."""

from __future__ import annotations

import pytest
import torch

from yun import kernels
from yun.layers import attention
from yun.layers.backend import TORCH, Backend, use_backend
from yun.layers.context import AttentionMetadata
from yun.layers.norm import RMSNorm
from yun.layers.rotary import apply_rope_

BUILDS = [isa for isa in kernels.ISAS if kernels.native(isa) is not None]
pytestmark = pytest.mark.skipif(not BUILDS, reason="no native kernel build runs here")


def _use(mod):
    """The kernels of one native build (None: pure torch), for the code inside the with."""
    return use_backend(TORCH if mod is None else
                       Backend(fused=mod, decode=mod.paged_decode_attention))


@pytest.fixture(params=BUILDS)
def build(request):
    return kernels.native(request.param)


def _decode_batch(dtype, H, KvH, D, g):
    NB, BS, B = 40, 16, 3
    cache = torch.randn(2, NB, BS, KvH, D, generator=g).to(dtype)
    lens = torch.tensor([1, 17, 150])  # context after this step's token
    tables = torch.stack([torch.randperm(NB, generator=g)[:10] for _ in range(B)])
    slots = tables[torch.arange(B), (lens - 1) // BS] * BS + (lens - 1) % BS
    mask = (torch.arange(10 * BS)[None, :] < lens[:, None])[:, None, None, :]
    meta = AttentionMetadata(slots, B, tables, lens, mask)
    qkv = torch.randn(B, (H + 2 * KvH) * D, generator=g).to(dtype)
    pos = lens - 1
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(pos.float(), inv)] * 2, dim=-1)  # [B, D]
    return qkv, emb.cos().to(dtype), emb.sin().to(dtype), cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KvH,D", [(9, 3, 64), (14, 2, 64), (4, 4, 32)])
def test_one_call_decode_attention_equals_the_separate_native_ops(build, dtype, H, KvH, D):
    qkv, cos, sin, cache, meta = _decode_batch(dtype, H, KvH, D, torch.Generator().manual_seed(D + H))
    with _use(build):
        cache_fused, qkv_fused = cache.clone(), qkv.clone()
        got = attention.qkv_attention(qkv_fused, H, KvH, cos, sin, cache_fused, D ** -0.5, meta)
        # The same native kernels one at a time, as the layers ran them before.
        heads = qkv.clone().view(-1, H + 2 * KvH, D)
        q, k = apply_rope_(heads[:, :H + KvH], cos, sin).split([H, KvH], dim=1)
        cache_sep = cache.clone()
        want = attention.paged_attention(q, k, heads[:, H + KvH:], cache_sep, D ** -0.5, meta)
    assert got.shape == (qkv.shape[0], H * D)
    assert torch.equal(got, want.reshape(got.shape))
    assert torch.equal(cache_fused, cache_sep)  # the new k and v in their slots, nothing else
    assert not torch.equal(cache_fused, cache)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_one_call_decode_attention_matches_torch(build, dtype, tol):
    H, KvH, D = 9, 3, 64
    qkv, cos, sin, cache, meta = _decode_batch(dtype, H, KvH, D, torch.Generator().manual_seed(1))
    with _use(build):
        c_native = cache.clone()
        got = attention.qkv_attention(qkv.clone(), H, KvH, cos, sin, c_native, D ** -0.5, meta)
    c_torch = cache.clone()  # outside: pure torch
    want = attention.qkv_attention(qkv.clone(), H, KvH, cos, sin, c_torch, D ** -0.5, meta)
    assert (got.float() - want.float()).abs().max().item() <= tol
    assert (c_native.float() - c_torch.float()).abs().max().item() <= tol


def test_one_call_decode_attention_rejects_a_slot_outside_the_cache(build):
    H, KvH, D = 4, 2, 32
    qkv, cos, sin, cache, meta = _decode_batch(torch.float32, H, KvH, D, torch.Generator().manual_seed(2))
    meta.slot_mapping[1] = cache.shape[1] * cache.shape[2]
    with pytest.raises(RuntimeError, match="outside the cache"):
        build.decode_attention_qkv(qkv, cos, sin, cache, meta.slot_mapping,
                                   meta.decode_block_tables, meta.decode_context_lens,
                                   H, KvH, D ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (5, 33)])
def test_add_rms_norm_equals_the_add_then_the_norm(build, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(shape[-1], generator=g).to(dtype)
    x, res = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    with _use(build):
        s, y = norm.add_forward(x, res)
        assert torch.equal(s, res + x)
        assert torch.equal(y, norm(res + x))  # the same native norm, one call
    s_t, y_t = norm.add_forward(x, res)
    assert torch.equal(s_t, s)
    eps = torch.finfo(dtype).eps
    assert ((y.float() - y_t.float()).abs() / (y_t.float().abs() * eps + 1e-30)).max() <= 3.01
