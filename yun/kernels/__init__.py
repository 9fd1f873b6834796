"""Native CPU kernels, built on first use with torch's extension tooling, with a pure-torch
fallback that is always correct.

Two builds of the same functions: AVX-512 (this folder) and AVX2 + FMA + F16C (avx2/),
chosen at run time by `native_isa` (the best the CPU runs; a caller may ask for one).
`bf16_gemv` is the decode path for bfloat16 weights: torch's own bf16 matrix-vector
product streams weights at about half the machine's bandwidth, and its bf16 GEMM on a
CPU without bf16 hardware runs at a few GFLOP/s (`bf16_gemm` widens inside the kernel). Build
problems never stop yun: they are logged once and the fallback (F.linear) is used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from typing import Callable

import torch

log = logging.getLogger("yun.kernels")

_SOURCES = ("gemv_bf16.cpp", "gemm_bf16.cpp", "paged_attention.cpp", "elementwise.cpp",
            "decode_step.cpp", "prefill_attention.cpp")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp",
          "-ffp-contract=off"]  # a * b + c stays two roundings, as in torch
# The same functions for x86-64 CPUs with AVX2 + FMA + F16C and no AVX-512 (avx2/).
_AVX2_SOURCES = (*(f"avx2/{s}" for s in ("module.cpp", "gemv_bf16.cpp", "gemm_bf16.cpp",
                                         "paged_attention.cpp", "elementwise.cpp")),
                 "decode_step.cpp",  # ISA-neutral: calls the build's own kernels
                 "prefill_attention.cpp")  # ISA-neutral: the vector width by #ifdef
_AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]

# The native kernel builds, best first: module name, sources, headers, compiler flags,
# and the CPU flags (yun.kernels.cpu's names) a CPU needs to run it.
ISAS = ("avx512", "avx2")
_BUILDS = {
    "avx512": ("yun_cpu_kernels", _SOURCES, ("bf16.h", "avx2/avx2.h"), _FLAGS,
               ("avx512f", "avx512bw", "avx512vl", "fma")),
    "avx2": ("yun_cpu_kernels_avx2", _AVX2_SOURCES, ("avx2/avx2.h",), _AVX2_FLAGS,
             ("avx2", "fma", "f16c")),
}


def native_isa(features: frozenset[str] | None = None, isa: str | None = None) -> str | None:
    """The native build a CPU with these features runs (default: this CPU's): "avx512"
    with avx512f/bw/vl + fma, else "avx2" with avx2 + fma + f16c, else None (torch).
    `isa` asks for one build (e.g. "avx2" on an AVX-512 CPU): it, if the CPU runs it."""
    if isa is not None and isa not in _BUILDS:
        raise ValueError(f"isa must be one of {ISAS} or None, got {isa!r}")
    if features is None:
        from yun.kernels.cpu import cpu_features

        features = cpu_features()
    for name in ISAS if isa is None else (isa,):
        if all(f in features for f in _BUILDS[name][4]):
            return name
    return None


def cpu_has_avx512() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return False
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "fma"))


def build_dir(isa: str = "avx512") -> str:
    """One build folder per build (`isa`), source tree and torch version.

    torch rebuilds an extension whose source paths changed, so two checkouts sharing one
    folder would rebuild each other's module (and wait on each other's lock).
    """
    from yun.model_source import cache_dir

    _, sources, headers, _, _ = _BUILDS[isa]
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(here.encode())
    for name in (*sources, *headers):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    prefix = "" if isa == "avx512" else f"{isa}-"
    path = os.path.join(cache_dir(), "kernels",
                        f"{prefix}torch-{torch.__version__}-{h.hexdigest()[:12]}")
    os.makedirs(path, exist_ok=True)
    return path


def _load_locked(path: str, **kwargs: object) -> object:
    """torch's own build lock is a plain file: a build killed half-way leaves it behind,
    and every later start would wait on it forever. We hold an OS lock (released when a
    process dies) around the build, so a torch lock found while holding it is stale."""
    import fcntl

    from torch.utils.cpp_extension import load

    with open(os.path.join(path, "yun.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            os.remove(os.path.join(path, "lock"))
            log.warning("yun: removed a stale kernel build lock in %s", path)
        except FileNotFoundError:
            pass
        return load(build_directory=path, **kwargs)


def native(isa: str | None = None) -> object | None:
    """The compiled kernel module: the best build this CPU runs (isa None), or the build
    `isa` names ("avx512", "avx2"; e.g. the AVX2 one on an AVX-512 CPU, for tests).
    None where it cannot be had here (the CPU lacks the features, no compiler)."""
    chosen = native_isa(isa=isa)
    return None if chosen is None else _build(chosen)


@functools.lru_cache(maxsize=None)
def _build(isa: str) -> object | None:
    name, sources, _, flags, _ = _BUILDS[isa]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return _load_locked(build_dir(isa), name=name,
                            sources=[os.path.join(here, s) for s in sources],
                            extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, odd platform: use torch's kernels
        log.warning("yun: native CPU kernels (%s) unavailable (%s); using torch's", isa, e)
        return None


def paged_decode_attention(isa: str | None = None) -> Callable[..., torch.Tensor] | None:
    mod = native(isa)
    return None if mod is None else mod.paged_decode_attention


MatmulFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def bf16_gemv(isa: str | None = None) -> MatmulFn | None:
    """x [M<=4, K] @ w[N, K].T for bf16 w: streams the weights once (decode)."""
    mod = native(isa)
    return None if mod is None else mod.gemv_bf16


def f32_gemv(isa: str | None = None) -> MatmulFn | None:
    """x [M<=4, K] @ w[N, K].T for fp32 w: streams the weights once (decode)."""
    mod = native(isa)
    return None if mod is None else mod.gemv_f32


def bf16_gemm(isa: str | None = None) -> MatmulFn | None:
    """x [M, K] @ w[N, K].T for bf16 w: register-blocked, weights widened once per block."""
    mod = native(isa)
    return None if mod is None else mod.gemm_bf16


def bf16_many_rows(native_gemm: MatmulFn, features: frozenset[str] | None = None) -> MatmulFn:
    """The bf16 matmul for many rows (prefill, batched decode) on this CPU: on AMX-BF16
    CPUs torch's own (oneDNN, AMX tiles), which there runs 3.5-4x faster than the native
    GEMM that widens to fp32 (Intel Xeon with AMX, 2 threads, M = 64, K = 576: 0.8-1.05
    against 0.23-0.27 TFLOP/s); elsewhere `native_gemm` (torch's bf16 GEMM on a CPU
    without bf16 hardware runs at a few GFLOP/s)."""
    from yun.kernels.cpu import cpu_features

    feats = cpu_features() if features is None else features
    return torch.nn.functional.linear if "amx_bf16" in feats else native_gemm


# (module, x [M, K], data [N, row_bytes], qtype, k, bias | None, isa) -> float32 [M, N]: a
# quantized matmul of many rows, with the quantized-kernel module and code path it runs.
ManyRowsFn = Callable[[object, torch.Tensor, torch.Tensor, int, int, torch.Tensor | None, str],
                      torch.Tensor]


def quant_many_rows(isa: str | None = None,
                    features: frozenset[str] | None = None) -> ManyRowsFn:
    """How a quantized matmul of many rows (prefill, batched decode) runs on this CPU: the
    weight dequantized once per call, then a GEMM. Where this CPU multiplies bf16 fast, to
    bf16 for torch's GEMM (oneDNN) on AMX-BF16 or the native vdpbf16ps one on AVX512-BF16,
    x rounded to bf16; elsewhere to float32, a cache-sized tile at a time, for torch's
    float32 GEMM (MKL / oneDNN: on an AVX2 CPU about twice the integer kernels' speed, see
    FP32_MANY_ROWS_FROM), x as it is. The product comes back in float32."""
    from yun.kernels.cpu import cpu_features

    feats = cpu_features() if features is None else features
    if "amx_bf16" in feats:
        return functools.partial(_bf16_many_rows, _amx_gemm)
    if "avx512_bf16" in feats and isa in (None, "avx512"):
        mod = native("avx512")
        if mod is not None and mod.gemm_bf16_has_dot():
            return functools.partial(_bf16_many_rows,
                                     functools.partial(_dot_gemm, mod.gemm_bf16_kernel))
    return _f32_many_rows


# From how many rows of x a quantized matmul takes quant_many_rows' GEMM: where it beats
# the integer kernels once the dequantization is shared by that many rows.
# vdpbf16ps (AMD Zen 4, 2 threads, scripts/bench_quant.py, SmolLM2-135M's shapes and
# 896 x 4864, Q5_0 Q8_0 Q4_K Q6_K, GFLOP/s dequantize_bf16 + GEMM / int16 kernels):
# 96-176 / 122-168 at M = 16, 120-206 / 122-164 at 24 (even), 139-232 / 117-197 at 32,
# 174-265 / 113-198 at 64 (2026-12-04; 128 before the dequantization got 3-6x faster).
# AMX (Intel Xeon, 2 threads, SmolLM2-135M's MLP shapes, scripts/bench_quant.py): the int16
# VNNI kernels 150-185 GFLOP/s at every M; dequantization + oneDNN 167-197 at M = 16,
# 300-340 at 32, 470-560 at 64.
DOT_MANY_ROWS_FROM = 32
AMX_MANY_ROWS_FROM = 32
# The float32 path (quant.cpp's matmul_dequant_f32: the weight dequantized to float32, then
# torch's float32 GEMM) against the int16 kernels, by the quantized path the CPU takes
# (yun.kernels.cpu.quant_path). Intel Xeon with AMX, 2 threads, capped with YUN_MAX_CPU_ISA
# (torch's libraries too), SmolLM2-135M's MLP shapes, Q8_0 Q5_0 Q4_K Q6_K,
# scripts/bench_quant.py, GFLOP/s float32 path / int16 kernels:
#   avx2: 112-115 / 88-102 at M = 16; 72-74 / 93-121 at M = 8;
#   avx2-vnni: 112-119 / 94-121 at 16 (even); 144-151 / 97-117 at 32;
#   avx512-vnni (no BF16): 145-188 / 147-164 at 32 (even); 206-217 / 132-171 at 64;
#   avx512 (no VNNI): not measured, taken as between the two;
#   scalar (no AVX2; aarch64): 17-18 / 1.7-2.4 at M = 1.
FP32_MANY_ROWS_FROM = {"avx512-vnni": 64, "avx512": 32, "avx2-vnni": 32, "avx2": 16, "scalar": 1}


def quant_many_rows_from(features: frozenset[str] | None = None,
                         isa: str | None = None) -> int:
    """The row count from which quant_many_rows' GEMM runs on this CPU (see above)."""
    from yun.kernels.cpu import cpu_features, quant_path

    feats = cpu_features() if features is None else features
    if "amx_bf16" in feats:
        return AMX_MANY_ROWS_FROM
    if quant_many_rows_dtype(feats, isa) == torch.bfloat16:
        return DOT_MANY_ROWS_FROM
    return FP32_MANY_ROWS_FROM[quant_path(feats)]


def quant_many_rows_dtype(features: frozenset[str] | None = None,
                          isa: str | None = None) -> torch.dtype:
    """The dtype quant_many_rows dequantizes the weight to."""
    return torch.float32 if quant_many_rows(isa, features) is _f32_many_rows else torch.bfloat16


def _bf16_many_rows(gemm: MatmulFn, module: object, x: torch.Tensor, data: torch.Tensor,
                    qtype: int, k: int, bias: torch.Tensor | None, isa: str) -> torch.Tensor:
    return gemm(x, module.dequantize_bf16(data, qtype, k, isa), bias)


def _f32_many_rows(module: object, x: torch.Tensor, data: torch.Tensor, qtype: int, k: int,
                   bias: torch.Tensor | None, isa: str) -> torch.Tensor:
    return module.matmul_dequant_f32(x, data, qtype, k, bias, isa)


def _dot_gemm(gemm: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    return gemm(x.float(), w, bias, "dot")  # float32 out: no rounding of y to bf16


def _amx_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.nn.functional.linear(x.to(torch.bfloat16), w).float()
    return y if bias is None else y + bias.float()


def elementwise(isa: str | None = None) -> object | None:
    """The module with fused rms_norm / silu_and_mul / rope_neox_ (see elementwise.cpp)."""
    return native(isa)


_QUANT_FILES = ("quant.cpp", "quant.h", "quant_avx512.h", "quant_avx2.h")
# No -m flags: each code path carries its own target pragma (the build folder is shared
# by sessions whose CPUs differ). -ffp-contract=off: a * b + c stays two roundings.
_QUANT_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def quant_build_dir() -> str:
    """The quantized-matmul extension's build folder: per source tree, sources and torch."""
    from yun.model_source import cache_dir

    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(here.encode())
    for name in _QUANT_FILES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    path = os.path.join(cache_dir(), "kernels",
                        f"quant-torch-{torch.__version__}-{h.hexdigest()[:12]}")
    os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def quant() -> object | None:
    """The quantized matmul extension (`matmul`, `isas`), or None where it cannot be had."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return _load_locked(quant_build_dir(), name="yun_quant_kernels",
                            sources=[os.path.join(here, "quant.cpp")],
                            extra_cflags=_QUANT_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, odd platform: dequantize + F.linear
        log.warning("yun: native quantized kernels unavailable (%s); using torch", e)
        return None
