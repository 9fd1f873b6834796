"""Prefill attention per call: the native kernel (yun/kernels/prefill_attention.cpp, each
build this CPU runs) against torch's SDPA as yun.layers.attention calls it (gathered
cache, a mask after a cached prefix), on the same paged cache. GFLOP/s counts the causal
half only: 4 * H * D per (query, visible key) pair.

    .venv/bin/python scripts/bench_prefill_attention.py [--threads 2] [--heads 9 3] [--dim 64]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from yun import kernels
from yun.layers import attention
from yun.layers.context import AttentionMetadata, PrefillSeq

CASES = {  # name: [(q_len, ctx_len)] per sequence
    "1 x 512 fresh": [(512, 512)],
    "4 x 128 fresh": [(128, 128)] * 4,
    "64 after 448 cached": [(64, 512)],
    "512 after 1536 cached": [(512, 2048)],
}


def case(seqs, H, KvH, D, BS, dtype):
    g = torch.Generator().manual_seed(0)
    nblocks = [math.ceil(c / BS) for _, c in seqs]
    order = torch.randperm(sum(nblocks), generator=g)
    cache = torch.randn(2, len(order), BS, KvH, D, generator=g).to(dtype)
    q = torch.randn(sum(q for q, _ in seqs), H, D, generator=g).to(dtype)
    prefills, start, used = [], 0, 0
    for (ql, cl), nb in zip(seqs, nblocks):
        prefills.append(PrefillSeq(start, ql, cl, order[used:used + nb].long()))
        start, used = start + ql, used + nb
    meta = AttentionMetadata(slot_mapping=torch.zeros(q.shape[0], dtype=torch.long),
                             num_decodes=0, decode_block_tables=None, decode_context_lens=None,
                             decode_mask=None, prefills=prefills)
    return q, cache, meta


def sdpa(q, cache, meta, scale):
    for p in meta.prefills:
        qs = q[p.q_start:p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
        ks = attention.gather_kv(cache[0], p.block_table)[:p.ctx_len].transpose(0, 1).unsqueeze(0)
        vs = attention.gather_kv(cache[1], p.block_table)[:p.ctx_len].transpose(0, 1).unsqueeze(0)
        if p.ctx_len == p.q_len:
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = attention._causal_mask(p.q_len, p.ctx_len, None, q.device)
            F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                           enable_gqa=True)


def best(fn, n: int = 10) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, nargs=2, default=(9, 3), metavar=("H", "KVH"))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, KvH, D = *args.heads, args.dim
    builds = [isa for isa in kernels.ISAS if kernels.native(isa) is not None]
    print(f"H={H} KvH={KvH} D={D}, {args.threads} threads; ms per call (GFLOP/s)")
    print(f"{'dtype':9s} {'prefills':22s}" + "".join(f"{b:>20s}" for b in builds)
          + f"{'torch SDPA':>20s}")
    for dtype in (torch.bfloat16, torch.float32):
        for name, seqs in CASES.items():
            q, cache, meta = case(seqs, H, KvH, D, args.block_size, dtype)
            flops = sum(4 * H * D * ql * (cl - ql + (ql + 1) / 2) for ql, cl in seqs)
            tb = attention._packed_prefills(meta, q.device)
            out = torch.empty(q.shape, dtype=dtype)
            cells = []
            for isa in builds:
                mod = kernels.native(isa)
                t = best(lambda: mod.prefill_attention(q, cache[0], cache[1], *tb, out,
                                                       D ** -0.5, 0))
                cells.append(t)
            cells.append(best(lambda: sdpa(q, cache, meta, D ** -0.5)))
            print(f"{str(dtype)[6:]:9s} {name:22s}" + "".join(
                f"{t * 1e3:10.3f} ({flops / t / 1e9:5.0f})   " for t in cells))


if __name__ == "__main__":
    main()
