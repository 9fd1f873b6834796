"""`YUN_MAX_CPU_ISA`: run yun as it runs on a lesser CPU, e.g. an AVX2-only one on an
AVX-512 machine, to reproduce a user's report or compare code paths end to end.

The cap removes CPU features above its level from what yun sees (yun.kernels.cpu), so
every choice that reads them (the native build, the quantized matmul path, AMX or
AVX512-BF16 GEMMs) is the one the lesser CPU gets. torch's own kernels are capped too,
through the variables torch's libraries read (oneDNN's ONEDNN_MAX_CPU_ISA, ATen's
ATEN_CPU_CAPABILITY, MKL's MKL_ENABLE_INSTRUCTIONS): importing `yun` sets the ones not
already set, so that has to happen before torch is imported (the `yun` command does).
A cap above what the CPU has changes nothing. This module imports neither torch nor numpy.
"""

from __future__ import annotations

import os

ENV = "YUN_MAX_CPU_ISA"

# Levels, lowest first: the x86 flags (Linux's names) each one allows, cumulatively.
_ADDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("scalar", ()),
    ("avx2", ("avx2", "fma", "f16c")),
    ("avx2_vnni", ("avx_vnni",)),
    ("avx512", ("avx512f", "avx512bw", "avx512vl")),
    ("avx512_vnni", ("avx512_vnni",)),
    ("avx512_bf16", ("avx512_bf16",)),
    ("amx", ("amx_tile", "amx_bf16", "amx_int8")),
)
LEVELS = tuple(name for name, _ in _ADDS)

# The variables torch's libraries read, and what each is told at each level ("amx" leaves
# them alone).
TORCH_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
_TORCH_CAPS = {
    "scalar": ("SSE41", "default", "SSE4_2"),
    "avx2": ("AVX2", "avx2", "AVX2"),
    "avx2_vnni": ("AVX2_VNNI", "avx2", "AVX2"),
    "avx512": ("AVX512_CORE", "avx512", "AVX512"),
    "avx512_vnni": ("AVX512_CORE_VNNI", "avx512", "AVX512"),
    "avx512_bf16": ("AVX512_CORE_BF16", "avx512", "AVX512"),
}


def max_isa() -> str | None:
    """The cap asked for in the environment (None: none). An unknown name raises
    ValueError naming the ones there are."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in LEVELS:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(LEVELS)}")
    return value


def allowed(level: str) -> frozenset[str]:
    """The x86 flags a CPU capped at `level` may use."""
    out: set[str] = set()
    for name, adds in _ADDS:
        out.update(adds)
        if name == level:
            return frozenset(out)
    raise ValueError(f"unknown ISA level {level!r}: use one of {', '.join(LEVELS)}")


def cap(features: frozenset[str], arm: bool = False) -> frozenset[str]:
    """`features` less what the cap removes. On aarch64 only "scalar" removes anything
    (NEON and dotprod are below every x86 level's meaning)."""
    level = max_isa()
    if level is None:
        return features
    if arm:
        return frozenset() if level == "scalar" else features
    return features & allowed(level)


def apply_to_torch() -> None:
    """Sets torch's libraries' ISA variables for the cap (those not set already). Called
    when `yun` is imported; it has no effect on a torch that has run a kernel already. An
    unknown level sets nothing here: the first kernel choice raises its ValueError (so
    `yun --help` still runs, and a command reports it as `yun: error: ...`)."""
    try:
        level = max_isa()
    except ValueError:
        return
    if level is None or level not in _TORCH_CAPS:
        return
    for var, value in zip(TORCH_VARS, _TORCH_CAPS[level]):
        os.environ.setdefault(var, value)
