"""Native fused elementwise ops (RMSNorm, SiLU-and-mul, rotary) against the torch code
that stays their fallback, and the layers' dispatch to them."""

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

ops = kernels.elementwise()
pytestmark = pytest.mark.skipif(ops is None, reason="no AVX-512 or no compiler here")
DTYPES = [torch.float32, torch.bfloat16]


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's last place at b's magnitude."""
    eps = torch.finfo(a.dtype).eps
    return ((a.float() - b.float()).abs() / (b.float().abs() * eps + 1e-30)).max().item()


@pytest.fixture
def native():
    with use_backend(Backend(fused=ops)):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (7, 64), (3, 5, 24), (2, 33)])
def test_rms_norm_matches_torch(native, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(shape[-1], generator=g).to(dtype)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    got = norm(x)
    with use_backend(TORCH):
        want = norm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Only the sum of squares' order and the reciprocal square root's rounding differ;
    # two roundings follow (x * s, weight * h): a few ulps of the dtype at most.
    assert ulps(got, want) <= 3.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 4864), (5, 24), (3, 37)])
def test_silu_and_mul_matches_torch(native, dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    x = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # saturating exp at both ends
    got = silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # exp's last bits may flip a rounding
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D", [(1, 14, 64), (9, 2, 128), (4, 3, 40)])
def test_rope_in_place_matches_torch_on_views(native, dtype, T, H, D):
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
    assert torch.equal(qkv[:, H * D:], rest)  # neighbours untouched
    # Same roundings as torch's op-by-op bf16 arithmetic: identical results.
    assert torch.equal(got, want)


def test_layers_fall_back_to_torch_without_the_kernels():
    x = torch.randn(2, 8)
    assert torch.equal(silu_and_mul(x), F.silu(x[:, :4]) * x[:, 4:])
    assert not fused.usable(x)  # outside any engine: the pure-torch backend
    with use_backend(Backend(fused=ops)):
        assert fused.usable(x) and not fused.usable(x.half())
    assert not fused.usable(x)  # nothing stays installed
