"""Weights in transparent huge pages (CPU, Linux).

Decode streams every weight once per token. With 4 KiB pages that is a TLB miss every
4 KiB; in 2 MiB pages the same stream runs faster (measured on the demo model's decode
matrices, 2 threads: ~18 -> ~20-21 GB/s with the native kernel). torch's allocator
uses huge pages only when THP_MEM_ALLOC_ENABLE is set before it first allocates, which
we cannot count on, so the loaded weights (parameters, and the buffers that hold the
quantized GGUF blocks) are copied into one anonymous mapping advised MADV_HUGEPAGE. Where
that is unavailable nothing changes.
"""

from __future__ import annotations

import logging
import mmap
import sys

import torch
from torch import nn

log = logging.getLogger("yun.models")

ALIGN = 4096  # each tensor starts on its own page: never shares a line with another
MIN_BYTES = 64 * 2**20  # below this the TLB covers the weights anyway


def thp_available() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def place_in_huge_pages(model: nn.Module) -> int:
    """Move every CPU parameter and contiguous buffer of `model` into one huge-page
    mapping; returns its size in bytes (0 if nothing moved). A tensor met twice (tied
    embeddings) moves once, and so do two tensors that view the same bytes the same way
    (pointer, dtype, shape and strides)."""
    tensors: list[torch.Tensor] = []
    seen: set[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = set()
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.device.type == "cpu" and t.is_contiguous() and t.numel() and key not in seen:
            seen.add(key)
            tensors.append(t)
    total = sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors)
    if total < MIN_BYTES or not thp_available():
        return 0
    size = -(-total // (2 << 20)) * (2 << 20)  # whole huge pages
    try:
        arena = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as e:
        log.info("yun: weights stay in 4 KiB pages (%s)", e)
        return 0
    buf = torch.frombuffer(arena, dtype=torch.uint8)  # keeps `arena` alive
    moved: dict[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    offset = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in moved:  # a second tensor over the same bytes: share the moved copy
            t.data = moved[key]
            continue
        if key not in seen:
            continue
        n = t.numel() * t.element_size()
        dst = buf[offset:offset + n].view(t.dtype).view(t.shape)
        dst.copy_(t.data)
        moved[key] = dst
        t.data = dst  # the old storage is freed here, one tensor at a time
        offset += -(-n // ALIGN) * ALIGN
    return size
