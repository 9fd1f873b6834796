"""The native prefill attention (yun/kernels/prefill_attention.cpp), both builds this CPU
runs, against float64 attention over the same paged cache: fresh prompts, chunks after a
cached prefix, several sequences in one call, sliding windows, GQA, block sizes that do
not divide the chunk, and the engine's own prefill through the kernel against torch's."""

from __future__ import annotations

import math

import pytest
import torch

from yun import kernels
from yun.layers import attention
from yun.layers.backend import Backend, use_backend
from yun.layers.context import AttentionMetadata, PrefillSeq

BUILDS = [isa for isa in kernels.ISAS if kernels.native(isa) is not None]
needs_native = pytest.mark.skipif(not BUILDS, reason="no native kernel build runs here")


def _case(seqs, H, KvH, D, BS, dtype, seed=0):
    """seqs: [(q_len, ctx_len)]. A cache with every sequence's keys/values in shuffled
    blocks, q for the step's rows, and the prefill metadata."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [math.ceil(c / BS) for _, c in seqs]
    order = torch.randperm(sum(nblocks) + 3, generator=g)  # spare blocks left unused
    cache = torch.randn(2, len(order), BS, KvH, D, generator=g).to(dtype)
    T = sum(q for q, _ in seqs) + 2  # two rows that are not prefills (decode rows)
    qkv = torch.randn(T, H + 2 * KvH, D, generator=g).to(dtype)
    q = qkv[:, :H]  # a strided view, as the model passes it
    prefills, start, used = [], 2, 0
    slots = [int(order[-1]) * BS, int(order[-1]) * BS + 1]  # the other rows: a spare block
    for (ql, cl), nb in zip(seqs, nblocks):
        table = order[used:used + nb].long()
        used += nb
        prefills.append(PrefillSeq(start, ql, cl, table))
        slots += [int(table[t // BS]) * BS + t % BS for t in range(cl - ql, cl)]
        start += ql
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), num_decodes=0,
                             decode_block_tables=None, decode_context_lens=None,
                             decode_mask=None, prefills=prefills)
    return q, cache, meta


def _reference(q, cache, meta, scale, window):
    out = torch.zeros(q.shape, dtype=torch.float64)
    H, KvH = q.shape[1], cache.shape[3]
    for p in meta.prefills:
        k = attention.gather_kv(cache[0], p.block_table)[:p.ctx_len].double()
        v = attention.gather_kv(cache[1], p.block_table)[:p.ctx_len].double()
        k, v = k.repeat_interleave(H // KvH, 1), v.repeat_interleave(H // KvH, 1)
        qs = q[p.q_start:p.q_start + p.q_len].double()
        s = torch.einsum("thd,khd->htk", qs, k) * scale
        mask = attention._causal_mask(p.q_len, p.ctx_len, window, q.device)
        s = s.masked_fill(~mask, float("-inf"))
        out[p.q_start:p.q_start + p.q_len] = torch.einsum("htk,khd->thd", s.softmax(-1), v)
    return out


@needs_native
@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqs,H,KvH,D,BS,window", [
    ([(37, 37)], 9, 3, 64, 16, 0),  # a fresh prompt, GQA 3, a tail tile
    ([(5, 70), (64, 64), (1, 1), (33, 100)], 4, 2, 64, 16, 0),  # chunks after cached prefixes
    ([(50, 50), (20, 90)], 2, 2, 128, 5, 0),  # block size 5: chunks straddle blocks
    ([(80, 80), (17, 60)], 6, 1, 64, 16, 24),  # sliding window, MQA
    ([(3, 200)], 8, 8, 64, 32, 7),  # a window narrower than a key chunk
])
def test_prefill_attention_matches_float64(isa, dtype, seqs, H, KvH, D, BS, window):
    mod = kernels.native(isa)
    q, cache, meta = _case(seqs, H, KvH, D, BS, dtype)
    scale = D ** -0.5
    tables, q_starts, q_lens, ctx_lens = attention._packed_prefills(meta, q.device)
    out = torch.full(q.shape, 7.0, dtype=dtype)
    mod.prefill_attention(q, cache[0], cache[1], tables, q_starts, q_lens, ctx_lens, out,
                          scale, window)
    want = _reference(q, cache, meta, scale, window or None)
    rel = 0.0 if dtype == torch.float32 else 2 ** -8
    assert (out[:2] == 7.0).all()  # rows that are not prefills: left as they were
    err = ((out[2:].double() - want[2:]).abs() - rel * want[2:].abs()).max().item()
    # fp32 math: ~1e-6; bf16: q, k, v are exact in the reference, the output rounded once
    # (half an ulp of 8 significant bits: at most 2^-8 relative)
    assert err <= 2e-6, err


@needs_native
def test_prefill_attention_rejects_what_it_cannot_run():
    mod = kernels.native(BUILDS[0])
    q, cache, meta = _case([(4, 4)], 2, 1, 64, 16, torch.float32)
    tables, q_starts, q_lens, ctx_lens = attention._packed_prefills(meta, q.device)
    out = torch.empty(q.shape)
    with pytest.raises(RuntimeError, match="one dtype"):
        mod.prefill_attention(q, cache[0].bfloat16(), cache[1].bfloat16(), tables, q_starts,
                              q_lens, ctx_lens, out, 1.0, 0)
    with pytest.raises(RuntimeError, match="out of range"):
        mod.prefill_attention(q, cache[0], cache[1], tables, q_starts, q_lens + 100,
                              ctx_lens + 100, out, 1.0, 0)
    q80, cache80, _ = _case([(4, 4)], 2, 1, 80, 16, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        mod.prefill_attention(q80, cache80[0], cache80[1], tables, q_starts, q_lens, ctx_lens,
                              torch.empty(q80.shape), 1.0, 0)


@needs_native
@pytest.mark.parametrize("isa", BUILDS)
def test_paged_attention_takes_the_kernel_and_agrees_with_sdpa(isa):
    """paged_attention's prefill rows with the native module as the backend's fused ops
    against the same call on pure torch (SDPA), and D = 80 falling back to SDPA."""
    for D in (64, 80):
        q, cache, meta = _case([(30, 30), (10, 45)], 6, 2, D, 16, torch.float32, seed=1)
        T = q.shape[0]
        k = torch.randn(T, 2, D)
        v = torch.randn(T, 2, D)
        calls = []
        mod = kernels.native(isa)

        class Spy:
            def __getattr__(self, name):
                if name == "prefill_attention":
                    def run(*a):
                        calls.append(D)
                        return mod.prefill_attention(*a)
                    return run
                return getattr(mod, name)

        with use_backend(Backend(fused=Spy())):
            got = attention.paged_attention(q, k, v, cache.clone(), D ** -0.5, meta)
        want = attention.paged_attention(q, k, v, cache.clone(), D ** -0.5, meta)
        assert calls == ([64] if D == 64 else [])
        assert (got[2:] - want[2:]).abs().max() <= 1e-5
