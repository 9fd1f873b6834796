"""The int8 KV-cache rows (yun/layers/kv_quant.py) and the native decode kernels reading
them: the AVX-512 and AVX2 builds on an int8 cache equal the same kernels on that cache
dequantized (so the only error is the quantization's), and the fused decode step writes
rows bit for bit as the torch path does."""

from __future__ import annotations

import pytest
import torch

from yun import kernels
from yun.layers.kv_quant import dequantize_rows, head_dim_of, quantize_rows

B, H, KVH, D, NB, BS = 3, 6, 2, 64, 20, 16


def test_rows_round_trip_within_half_a_step():
    x = torch.randn(50, KVH, D) * torch.logspace(-3, 2, 50)[:, None, None]
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, KVH, D + 4)
    assert head_dim_of(rows) == D
    back = dequantize_rows(rows, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * 1.0001).all()
    assert torch.equal(dequantize_rows(quantize_rows(torch.zeros(2, D)), torch.float32),
                       torch.zeros(2, D))


def _case(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    kq = quantize_rows(torch.randn(NB, BS, KVH, D, generator=g))
    vq = quantize_rows(torch.randn(NB, BS, KVH, D, generator=g))
    q = torch.randn(B, H, D, generator=g).to(dtype)
    tables = torch.randperm(NB, generator=g)[:B * 5].view(B, 5)
    return q, kq, vq, tables, torch.tensor([70, 33, 5])


@pytest.mark.parametrize("isa", kernels.ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 20])
def test_native_decode_on_int8_equals_it_on_the_dequantized_cache(isa, dtype, window):
    mod = kernels.native(isa)
    if mod is None:
        pytest.skip(f"no {isa} build on this CPU")
    q, kq, vq, tables, lens = _case(dtype)
    out = mod.paged_decode_attention(q, kq, vq, tables, lens, D ** -0.5, window)
    kf, vf = dequantize_rows(kq, dtype), dequantize_rows(vq, dtype)
    ref = mod.paged_decode_attention(q, kf.contiguous(), vf.contiguous(), tables, lens,
                                     D ** -0.5, window)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: two steps of bf16 at 1
    assert (out.float() - ref.float()).abs().max().item() <= tol


@pytest.mark.parametrize("isa", kernels.ISAS)
def test_fused_decode_step_writes_the_rows_torch_writes(isa):
    mod = kernels.native(isa)
    if mod is None:
        pytest.skip(f"no {isa} build on this CPU")
    from yun.layers import attention
    from yun.layers.backend import TORCH, use_backend
    from yun.layers.context import AttentionMetadata

    _, _, _, tables, lens = _case(torch.float32)
    qkv = torch.randn(B, (H + 2 * KVH) * D, generator=torch.Generator().manual_seed(4))
    cos, sin = torch.ones(B, D), torch.zeros(B, D)  # rotary off: compare the writes
    slots = tables[:, 0] * BS + (lens - 1) % BS  # the last position's slot (block 0 of each)
    lens = (lens - 1) % BS + 1
    native = torch.zeros(2, NB, BS, KVH, D + 4, dtype=torch.int8)
    out = mod.decode_attention_qkv(qkv.clone(), cos, sin, native, slots, tables, lens, H, KVH,
                                   D ** -0.5, 0)
    heads = qkv.view(B, H + 2 * KVH, D)
    flat = native.view(2, NB * BS, KVH, D + 4)
    assert torch.equal(flat[0][slots], quantize_rows(heads[:, H:H + KVH]))
    assert torch.equal(flat[1][slots], quantize_rows(heads[:, H + KVH:]))
    torch_cache = torch.zeros_like(native)
    span = torch.arange(tables.shape[1] * BS)
    meta = AttentionMetadata(slots, B, tables, lens, (span[None] < lens[:, None])[:, None, None])
    with use_backend(TORCH):  # the torch path
        want = attention.paged_attention(heads[:, :H], heads[:, H:H + KVH], heads[:, H + KVH:],
                                         torch_cache, D ** -0.5, meta)
    assert torch.equal(torch_cache, native)
    assert (out.view(B, H, D) - want).abs().max().item() <= 1e-5


def test_fp8_cache_writes_saturate_and_read_back_within_e4m3_precision():
    from yun.layers import attention
    from yun.layers.kv_quant import FP8, dequantize_rows

    cache = torch.zeros(2, 2, BS, KVH, D, dtype=FP8)
    k = torch.randn(3, KVH, D) * 4
    k[0, 0, 0], k[1, 0, 1] = 1e4, -1e4  # out of e4m3's range: saturate, never NaN
    v = torch.randn(3, KVH, D)
    attention.write_kv(cache, k, v, torch.tensor([0, 5, BS + 2]))
    back = dequantize_rows(cache[0].view(-1, KVH, D)[[0, 5, BS + 2]], torch.float32)
    assert not back.isnan().any()
    assert back[0, 0, 0] == 448 and back[1, 0, 1] == -448
    ok = k.abs() <= 448
    rel = ((back - k).abs() / k.abs().clamp_min(2 ** -6))[ok]
    assert rel.max() <= 1 / 16 + 1e-6  # 3 mantissa bits: half a step is 1/16 relative
