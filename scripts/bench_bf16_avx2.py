"""GFLOP/s of the AVX2 bf16 GEMM (and the AVX-512 one, torch fp32/bf16 F.linear) on an
up-projection shape, and GB/s of the AVX2 bf16 gemv at M=1 (weights hot in cache, and
cold: cycling through copies bigger than the last-level cache). About 30 s.

    .venv/bin/python scripts/bench_bf16_avx2.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from yun import kernels


def per_call(fn, budget: float = 1.0) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget:
        fn()
        n += 1
    return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    avx2, avx512 = kernels.native("avx2"), kernels.native("avx512")
    N, K = 4864, 896  # w [N, K]: x [M, 896] -> [M, 4864]
    w = torch.randn(N, K).bfloat16()
    wf = w.float()
    for M in (64, 512):
        x = torch.randn(M, K).bfloat16()
        xf = x.float()
        flop = 2 * M * N * K
        cells = {"avx2 gemm_bf16": lambda: avx2.gemm_bf16(x, w, None),
                 "torch fp32 F.linear": lambda: F.linear(xf, wf),
                 "torch bf16 F.linear": lambda: F.linear(x, w)}
        if avx512 is not None:
            cells["avx512 gemm_bf16"] = lambda: avx512.gemm_bf16(x, w, None)
        line = ", ".join(f"{name} {flop / per_call(fn, 1.5 if 'torch bf16' in name else 1.0) / 1e9:.1f}"
                         for name, fn in cells.items())
        print(f"GEMM M={M} x[{M},{K}] @ w[{N},{K}].T (GFLOP/s, {args.threads} threads): {line}")
    for n_out, k_in in ((896, 4864), (4864, 896)):
        ws = [torch.randn(n_out, k_in).bfloat16() for _ in range(16)]  # 16 x 8.7 MB
        x1 = torch.randn(1, k_in).bfloat16()
        nbytes = ws[0].numel() * 2
        hot = per_call(lambda: avx2.gemv_bf16(x1, ws[0], None))
        it = iter(range(10**9))
        cold = per_call(lambda: avx2.gemv_bf16(x1, ws[next(it) % 16], None))
        msg = f"gemv M=1 w[{n_out},{k_in}] bf16 (GB/s): avx2 hot {nbytes / hot / 1e9:.1f}, " \
              f"avx2 cold {nbytes / cold / 1e9:.1f}"
        if avx512 is not None:
            it = iter(range(10**9))
            cold5 = per_call(lambda: avx512.gemv_bf16(x1, ws[next(it) % 16], None))
            msg += f", avx512 cold {nbytes / cold5 / 1e9:.1f}"
        print(msg)


if __name__ == "__main__":
    main()
