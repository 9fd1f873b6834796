"""The kernel choices of one engine, in one typed object (`Backend`).

A runner builds its backend once, from the CPU's features and its config (which native
kernels exist, the ISA asked for, the model's dtype and weights), and runs every
forward pass and logits computation inside `use_backend(backend)`. The layers ask
`current()` for the kernels to use: nothing is installed in a module, so two engines in
one process (a target and its draft, a test's second LLM) never take each other's
choices, and code outside any engine (tests, scripts) gets `TORCH`, the pure-torch path
that is also the reference the native kernels are tested against.

`use_backend` scopes the choice to the calling thread and the code inside the `with`
(a context variable, like the per-step `forward_context`).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

# (x [M, K], weight [N, K] bf16, bias [N] | None) -> [M, N]
SkinnyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (q [B, H, D], k_cache, v_cache, block_tables, context_lens, scale, window) -> [B, H, D]
DecodeFn = Callable[..., torch.Tensor]

ACTIVATIONS = ("int16", "int8")  # the native quantized matmuls' activation modes, default first


@dataclass(frozen=True)
class QuantKernels:
    """The native quantized matmuls (yun.kernels.quant()) and how they run."""

    module: Any  # the compiled extension
    isa: str  # the code path its kernels take, e.g. "avx512-vnni"
    activations: str  # what x is quantized to: "int16" or "int8" blocks of 32
    # The many-row path (yun.kernels.quant_many_rows: the weight dequantized once per call
    # to many_rows_dtype, bf16 or float32, then a GEMM), called as
    # many_rows(module, x [M >= many_rows_from, K], data, qtype, k, bias, isa) -> float32;
    # or None (every row count on the integer kernels). From how many rows it pays, and in
    # which dtype, depends on the CPU (yun.kernels.quant_many_rows_from, _dtype).
    many_rows: Callable[..., torch.Tensor] | None = None
    many_rows_from: int = 0  # unused without many_rows
    many_rows_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def choose(cls, module: Any, isa: str | None = None,
               activations: str = ACTIVATIONS[0],
               many_rows: Callable[..., torch.Tensor] | None = None,
               many_rows_from: int = 0,
               many_rows_dtype: torch.dtype = torch.bfloat16) -> "QuantKernels":
        """`isa` forces one code path ("avx512-vnni", "avx512", "avx2-vnni", "avx2",
        "scalar"); by default the best one this CPU runs. A path the CPU cannot run
        raises ValueError. `activations`: "int16" blocks of 32 (the default: ~1e-5
        relative rounding) or "int8" (llama.cpp's numerics, ~4e-3). `many_rows` takes the
        matmuls of `many_rows_from` rows or more, on the weight dequantized to
        `many_rows_dtype` (bfloat16 or float32)."""
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {activations!r}")
        from yun.kernels.cpu import quant_paths

        usable = quant_paths()  # less what YUN_MAX_CPU_ISA removes
        runnable = [p for p in module.isas() if p in usable]
        chosen = isa or runnable[0]
        if chosen not in runnable:
            raise ValueError(f"quantized matmul path {chosen!r} cannot run on this CPU "
                             f"(this one runs: {', '.join(runnable)})")
        if many_rows is not None and many_rows_from < 1:
            raise ValueError(f"many_rows needs many_rows_from >= 1, got {many_rows_from}")
        if many_rows_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"many_rows_dtype must be bfloat16 or float32, got {many_rows_dtype}")
        return cls(module, chosen, activations, many_rows, many_rows_from, many_rows_dtype)

    @property
    def name(self) -> str:
        kind = "bf16" if self.many_rows_dtype == torch.bfloat16 else "fp32"
        many = f", >= {self.many_rows_from} rows: {kind}" if self.many_rows is not None else ""
        return f"{self.isa}/{self.activations}{many}"


@dataclass(frozen=True)
class Backend:
    """Which kernels the layers run; None everywhere (`TORCH`) is pure torch."""

    bf16: tuple[SkinnyFn, SkinnyFn] | None = None  # bf16 matmul: (few rows, many rows)
    f32: SkinnyFn | None = None  # fp32 weights at few rows (decode): the streaming GEMV
    decode: DecodeFn | None = None  # paged decode attention
    fused: Any = None  # the fused elementwise ops' extension (norms, SiLU, rotary, plans)
    quant: QuantKernels | None = None  # quantized GGUF matmuls

    @property
    def bf16_name(self) -> str:
        return "native" if self.bf16 is not None else "torch"

    @property
    def f32_name(self) -> str:
        return "native" if self.f32 is not None else "torch"

    @property
    def decode_name(self) -> str:
        return "native" if self.decode is not None else "torch"

    @property
    def quant_name(self) -> str:
        """The path quantized matmuls take on CPU: "ISA/activations", or "torch"."""
        return "torch" if self.quant is None else self.quant.name


TORCH = Backend()

_CURRENT: contextvars.ContextVar[Backend] = contextvars.ContextVar("yun_backend",
                                                                  default=TORCH)


def current() -> Backend:
    """The backend of the engine running now (TORCH outside any)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    token = _CURRENT.set(backend)
    try:
        yield backend
    finally:
        _CURRENT.reset(token)
