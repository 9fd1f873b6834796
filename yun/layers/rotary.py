"""Rotary position embeddings (neox layout: rotate the two halves) and every scaling that
checkpoints of yun's families declare, in one place for all of them (DeepSeek included):

- `linear`: all frequencies divided by `factor` (position interpolation).
- `llama3`: low frequencies divided by `factor`, high ones kept, a blend between.
- `yarn`: a ramp between interpolated and kept frequencies, cos/sin scaled by an
  attention factor (see yun/layers/yarn.py).
- `dynamic` (NTK-aware, as transformers does it): the base grows with the sequence's
  length once it passes `max_position_embeddings`: base * (factor * L / max_pos -
  (factor - 1)) ** (dim / (dim - 2)).
- `longrope`: per-frequency divisors, `short_factor` while the sequence is within
  `original_max_position_embeddings`, `long_factor` beyond it, and an attention factor.
- `freq_factors`: GGUF's form of llama3 scaling (a divisor per frequency).

`dynamic` and `longrope` depend on the sequence's length. Like transformers' generate,
the frequencies of a step's tokens come from the length their sequence reaches at the
end of that step (`L` above), and keys already cached keep the rotation they were
written with: a sequence prefilled in chunks, or decoded token by token, rotates each
step with its own base. transformers does the same when it is fed the same steps (its
rotary embedding recomputes `inv_freq` from `max(position_ids) + 1` on every forward);
the one difference is that yun decides per sequence, where transformers decides per
batch and remembers the longest length it saw until a short input resets it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from yun.layers import fused
from yun.layers.context import get_forward_context
from yun.layers.yarn import yarn_inv_freq

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "freq_factors")
LENGTH_DEPENDENT = ("dynamic", "longrope")


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


def _dynamic_inv_freq(dim: int, theta: float, factor: float, seq_len: int,
                      max_positions: int) -> torch.Tensor:
    """NTK-aware base for a sequence of `seq_len` > max_positions tokens, computed in
    float32 tensors as transformers does (so the frequencies agree to the last bit)."""
    n = torch.tensor(seq_len, dtype=torch.int64, device="cpu")
    base = theta * ((factor * n / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _longrope_attention_factor(s: dict[str, Any], max_positions: int) -> float:
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / old_len
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))


def rope_parameters(dim: int, theta: float, scaling: dict[str, Any] | None,
                    max_positions: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim/2] float32, attention factor that multiplies cos and sin).

    `max_positions` is the config's max_position_embeddings; `seq_len` the sequence's
    length, read by the length-dependent scalings only (None: a short sequence)."""
    s = scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "default":
        return _inv_freq(dim, theta), 1.0
    if kind == "linear":
        return _inv_freq(dim, theta) / s["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_inv_freq(dim, theta), s), 1.0
    if kind == "freq_factors":
        factors = torch.tensor(s["factors"], dtype=torch.float32, device="cpu")
        return _inv_freq(dim, theta) / factors, 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, theta, s, max_positions)
    if kind == "dynamic":
        if seq_len is None or seq_len <= max_positions:
            return _inv_freq(dim, theta), 1.0
        return _dynamic_inv_freq(dim, theta, s["factor"], seq_len, max_positions), 1.0
    if kind == "longrope":
        long = seq_len is not None and seq_len > s["original_max_position_embeddings"]
        ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32,
                           device="cpu")
        if ext.numel() != dim // 2:
            raise ValueError(f"longrope {'long' if long else 'short'}_factor has {ext.numel()} "
                             f"values; the rotary dimension {dim} needs {dim // 2}")
        return _inv_freq(dim, theta) / ext, _longrope_attention_factor(s, max_positions)
    raise NotImplementedError(f"rope scaling {kind!r} is not supported; supported: "
                              f"{', '.join(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """cos/sin for a step's positions, from the scaling the checkpoint declares.

    cos/sin are computed for the step's positions (no table: a YaRN context of 128k
    positions would need one of 128k rows), as pos * inv_freq in float32 like
    transformers, then scaled by the attention factor."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None,
                 max_positions: int):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.max_positions = max_positions
        self.kind = (scaling or {}).get("rope_type", "default")
        inv_freq, self.attention_scaling = rope_parameters(dim, theta, scaling, max_positions)
        self._cpu_inv_freq = inv_freq.detach().to("cpu", torch.float32)  # [dim/2]
        self._by_len: dict[int, torch.Tensor] = {}  # length-dependent kinds: inv_freq per length
        self.build_buffers(torch.get_default_device())

    @property
    def length_dependent(self) -> bool:
        return self.kind in LENGTH_DEPENDENT

    def build_buffers(self, device: torch.device | str) -> None:
        """Move the frequencies to `device` (the loader calls this after placing the model)."""
        self.inv_freq = self._cpu_inv_freq.to(device)  # not a buffer: no checkpoint entry
        self._by_len.clear()

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        if self.kind == "longrope":  # two sets only: short (the initial one) and long
            old_len = self.scaling["original_max_position_embeddings"]
            seq_len = old_len + 1 if seq_len > old_len else 0
        if seq_len <= self.max_positions and (self.kind == "dynamic" or seq_len == 0):
            return self.inv_freq
        inv = self._by_len.get(seq_len)
        if inv is None:
            inv, _ = rope_parameters(self.dim, self.theta, self.scaling, self.max_positions,
                                     seq_len)
            if len(self._by_len) >= 4096:  # dynamic: one entry per length seen; bound it
                self._by_len.clear()
            self._by_len[seq_len] = inv = inv.to(self.inv_freq.device)
        return inv

    def _token_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """[T, dim/2]: each token's frequencies, from its sequence's length this step."""
        seq_lens = get_forward_context().attn.token_seq_lens(positions.shape[0])
        lens = seq_lens.tolist()
        distinct = sorted(set(lens))
        table = torch.stack([self._inv_freq_for(n) for n in distinct])  # [U, dim/2]
        index = {n: i for i, n in enumerate(distinct)}
        rows = torch.tensor([index[n] for n in lens], device=table.device)
        return table[rows]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, dim] in `dtype` (broadcast over heads)."""
        cos, sin = self.cos_sin_rows(positions, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def cos_sin_rows(self, positions: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, dim] contiguous rows in `dtype`, the form
        `apply_rope_` takes without reshaping (once per step, not once per layer)."""
        inv = self._token_inv_freq(positions) if self.length_dependent else self.inv_freq[None]
        freqs = positions.to(torch.float32)[:, None] * inv  # [T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


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
    ops = fused.ops_for(x)
    if (ops is not None and x.dim() == 3 and x.stride(-1) == 1 and cos.dtype == x.dtype
            and cos.shape[0] == x.shape[0]):
        if cos.dim() == 3:
            cos, sin = cos.flatten(1).contiguous(), sin.flatten(1).contiguous()
        return ops.rope_neox_(x, cos, sin)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return apply_rope(x, cos, sin)
