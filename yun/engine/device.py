"""Where an engine runs and what it may take: device, CPU threads, default KV-cache size.

A leaf (torch and yun.config only), so the runner, tensor-parallel ranks and the bench
share these defaults without importing each other.
"""

from __future__ import annotations

import os

import torch

from yun.config import KV_CACHE_CPU_FRACTION, KV_CACHE_CPU_MAX, KV_CACHE_GPU_FRACTION


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def default_threads() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a
    container's cpuset), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * KV_CACHE_GPU_FRACTION)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2**30
    return int(min(avail * KV_CACHE_CPU_FRACTION, KV_CACHE_CPU_MAX))
