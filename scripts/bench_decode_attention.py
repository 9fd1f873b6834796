"""Decode attention per call, straight from the native kernels: one sequence, SmolLM2's
heads (9 query / 3 KV, head_dim 64), an fp32 paged cache of 200 / 1,000 / 4,000 tokens.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_decode_attention.py --threads 1 --isa avx512
"""

from __future__ import annotations

import argparse
import time

import torch

from yun import kernels
from yun.kernels.cpu import describe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--isa", choices=kernels.ISAS, default=None,
                    help="the native build to time (default: the best this CPU runs)")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per length")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = kernels.native(args.isa)
    if mod is None:
        raise SystemExit("no native kernel build runs on this CPU")
    print(describe("-"), f"| build {kernels.native_isa(isa=args.isa)}, {args.threads} thread(s)")
    H, KvH, D, BS = 9, 3, 64, 16
    for L in (200, 1000, 4000):
        NB = L // BS + 2
        kc, vc = torch.randn(NB, BS, KvH, D), torch.randn(NB, BS, KvH, D)
        q, bt, lens = torch.randn(1, H, D), torch.arange(NB).view(1, -1), torch.tensor([L])
        for _ in range(20):
            mod.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5)
        t = time.perf_counter()
        for _ in range(args.calls):
            mod.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5)
        dt = (time.perf_counter() - t) / args.calls
        print(f"{L:5d} cached tokens: {dt * 1e6:7.1f} us per call, "
              f"{dt * 30e3:5.2f} ms per 30-layer step, K+V read at {2 * L * KvH * D * 4 / dt / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
