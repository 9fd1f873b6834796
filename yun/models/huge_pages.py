"""Weights in transparent huge pages (CPU, Linux).

Decode streams every weight once per token. With 4 KiB pages that is a TLB miss every
4 KiB; in 2 MiB pages the same stream runs faster (measured on the demo model's decode
matrices, 2 threads: ~18 -> ~20-21 GB/s with the native kernel). torch's allocator
uses huge pages only when THP_MEM_ALLOC_ENABLE is set before it first allocates, which
we cannot count on, so the loaded parameters are copied into one anonymous mapping
advised MADV_HUGEPAGE. Where that is unavailable nothing changes.
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
    """Move every CPU parameter of `model` into one huge-page mapping; returns its size
    in bytes (0 if nothing moved). Shared parameters (tied embeddings) move once."""
    params = [p for p in model.parameters() if p.device.type == "cpu"]
    total = sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for p in params)
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
    offset = 0
    for p in params:
        n = p.numel() * p.element_size()
        dst = buf[offset:offset + n].view(p.dtype).view(p.shape)
        dst.copy_(p.data)
        p.data = dst  # the old storage is freed here, one tensor at a time
        offset += -(-n // ALIGN) * ALIGN
    return size
