"""Rotary position embeddings (neox layout: rotate the two halves), with the scalings
that checkpoints declare: linear and llama3. YaRN lives with the model that uses it."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from yun.layers import fused


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by `factor`, keep high ones, blend between."""
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = _inv_freq(dim, theta)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "freq_factors":  # GGUF's form of llama3 scaling: a divisor per frequency
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    raise NotImplementedError(f"rope scaling {kind!r} is not supported for this model")


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table for every position; `cos_sin(positions)` picks rows."""

    def __init__(self, dim: int, max_positions: int, inv_freq: torch.Tensor,
                 attention_scaling: float = 1.0):
        super().__init__()
        self.dim = dim
        self.max_positions = max_positions
        self.inv_freq = inv_freq.detach().to("cpu", torch.float32)  # [dim/2], not a buffer
        self.attention_scaling = attention_scaling
        self.build_buffers(torch.get_default_device())

    def build_buffers(self, device: torch.device | str) -> None:
        """(Re)compute the float32 cos/sin tables on `device`."""
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [P, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, dim]
        self.register_buffer("cos", emb.cos() * self.attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * self.attention_scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, dim] in `dtype` (broadcast over heads)."""
        cos, sin = self.cos_sin_rows(positions, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def cos_sin_rows(self, positions: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, dim] contiguous rows in `dtype`, the form
        `apply_rope_` takes without reshaping (once per step, not once per layer)."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dim]; cos/sin: [T, 1, dim]."""
    return x * cos + rotate_half(x) * sin


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope`, in place where the native kernel can (x may be a view into a fused
    projection: it is overwritten); returns the rotated tensor either way.

    x: [T, heads, dim]; cos/sin: [T, dim] contiguous rows (`cos_sin_rows`) or [T, 1, dim].
    """
    if (fused.usable(x) and x.dim() == 3 and x.stride(-1) == 1 and cos.dtype == x.dtype
            and cos.shape[0] == x.shape[0]):
        if cos.dim() == 3:
            cos, sin = cos.flatten(1).contiguous(), sin.flatten(1).contiguous()
        return fused.ops.rope_neox_(x, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return apply_rope(x, cos, sin)
