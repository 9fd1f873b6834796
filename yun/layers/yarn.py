"""YaRN rope scaling (https://arxiv.org/abs/2309.00071), as Qwen2.5/Qwen3, Llama-style
and DeepSeek-V3 checkpoints configure it (transformers' `rope_type: yarn` fields).

Frequencies that turn fewer than `beta_slow` times over the original context are
interpolated (divided by `factor`), those turning more than `beta_fast` times are kept,
with a linear ramp between. cos/sin are multiplied by an attention factor, and DeepSeek
multiplies the softmax scale by `yarn_mscale(factor, mscale_all_dim) ** 2`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, theta: float, max_pos: int) -> float:
    """The rotary dimension whose frequency turns `rotations` times over `max_pos`."""
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(dim: int, theta: float, s: dict[str, Any], max_positions: int
                  ) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim/2], attention factor for cos/sin)."""
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / old_len
    attn = s.get("attention_factor")
    if attn is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attn = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attn = yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    low = _correction_dim(beta_fast, dim, theta, old_len)
    high = _correction_dim(beta_slow, dim, theta, old_len)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    idx = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu")  # 2i, i < dim/2
    ramp = ((idx / 2 - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (idx / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original frequency (high frequencies)
    return interpolated * (1 - keep) + extrapolated * keep, float(attn)
