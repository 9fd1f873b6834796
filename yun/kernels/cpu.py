"""What this CPU can run, from /proc/cpuinfo (Linux), for the start-up line and for choosing
native code paths. Read once per process; nothing here builds or imports a kernel."""

from __future__ import annotations

import functools
import platform

from yun import isa_cap

# The flags yun's kernels care about, as Linux names them.
X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
ARM_FLAGS = ("neon", "asimddp")  # Linux says "asimd" for NEON

# The quantized matmul's code paths (yun/kernels/quant.cpp), best first, and what each needs.
QUANT_PATHS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avx512-vnni", ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    ("avx512", ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl")),
    ("avx2-vnni", ("avx2", "fma", "f16c", "avx_vnni")),
    ("avx2", ("avx2", "fma", "f16c")),
    ("scalar", ()),
)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _field(name: str) -> str:
    """The first `name : value` line's value (one CPU is enough: they are all the same)."""
    for line in _cpuinfo().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return ""


@functools.lru_cache(maxsize=1)
def reported_features() -> frozenset[str]:
    """The subset of X86_FLAGS / ARM_FLAGS this CPU reports."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = set(_field("flags").split())
        return frozenset(f for f in X86_FLAGS if f in flags)
    if machine in ("aarch64", "arm64"):
        flags = set(_field("Features").split())
        found = {"neon"} if "asimd" in flags else set()
        return frozenset(found | ({"asimddp"} if "asimddp" in flags else set()))
    return frozenset()


def cpu_features() -> frozenset[str]:
    """The features yun uses: those this CPU reports, less what YUN_MAX_CPU_ISA removes
    (yun.isa_cap)."""
    return isa_cap.cap(reported_features(),
                       arm=platform.machine().lower() in ("aarch64", "arm64"))


def _amd_core(family: int, model: int) -> str | None:
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen"
    if family == 0x19:
        return "Zen 4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F
                           or 0xA0 <= model <= 0xAF) else "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return None


def cpu_model_name() -> str:
    """e.g. "AMD EPYC (Zen 4)", "Intel(R) Xeon(R) Platinum 8480+"; the architecture's
    name where /proc/cpuinfo has no model name (aarch64 often has none)."""
    name = _field("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if _field("vendor_id") == "AuthenticAMD":
        try:
            core = _amd_core(int(_field("cpu family")), int(_field("model")))
        except ValueError:
            core = None
        if core and core not in name:
            name = f"{name} ({core})"
    return name


def quant_paths(features: frozenset[str] | None = None) -> list[str]:
    """The quantized matmul paths a CPU with these features runs, best first (default:
    this CPU, less what YUN_MAX_CPU_ISA removes); "scalar" is always last."""
    have = cpu_features() if features is None else features
    return [name for name, needs in QUANT_PATHS if all(f in have for f in needs)]


def quant_path(features: frozenset[str] | None = None) -> str:
    """The quantized matmul path a CPU with these features takes (default: this CPU)."""
    return quant_paths(features)[0]


def describe(quant: str | None = None) -> str:
    """One line for the start-up log, e.g.
    "AMD EPYC (Zen 4): avx512_bf16 avx512_vnni; quantized matmul: avx512-vnni".
    `quant`: the path the engine's backend uses ("torch" when none); by default the one
    this CPU would take."""
    feats = cpu_features()
    # The strongest features only: avx512_vnni implies avx512f etc.
    shown = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni",
                         "asimddp") if f in feats]
    if not shown:
        shown = [f for f in ("avx512f", "avx2", "neon") if f in feats][:1]
    level = isa_cap.max_isa()
    capped = f" (capped: {isa_cap.ENV}={level})" if level else ""
    return (f"{cpu_model_name()}: {' '.join(shown) or 'no SIMD features found'}{capped}; "
            f"quantized matmul: {quant or quant_path()}")
