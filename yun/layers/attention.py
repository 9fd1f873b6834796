"""Attention over the paged KV cache (torch SDPA; correct on CPU and CUDA).

The cache of one layer is `[2, num_blocks, block_size, kv_heads, head_dim]` (K then V).
New keys/values are written to their slots first; then decodes (one query each) run as
one batched SDPA over their gathered blocks, and each prefill (chunk) runs on its own:
a fresh prompt attends to its own keys causally without touching the cache, a chunk
after a cached prefix attends to the gathered prefix plus itself.

Sliding-window layers (`window` = W) let the query at position p see keys p - W < k <= p,
as transformers' sliding-window mask does; the native decode kernel starts its loop at
the window's first key.

An int8 cache (`--kv-cache-dtype int8`, rows of yun/layers/kv_quant.py) is quantized as
it is written and dequantized as it is read: gathered blocks here, row by row in the
native decode kernels. A fresh prompt's own attention uses its unquantized keys/values
(they are at hand); later chunks and decodes read the quantized ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yun.layers import fused
from yun.layers.backend import current
from yun.layers.context import AttentionMetadata, get_forward_context
from yun.layers.kv_quant import dequantize_rows, is_fp8, is_quantized, quantize_rows, to_fp8
from yun.layers.rotary import apply_rope_



def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] into their slots of cache [2, NB, BS, KvH, D] (an
    int8 cache: [..., D + 4], quantized rows)."""
    _, nb, bs, kvh, d = cache.shape
    flat = cache.view(2, nb * bs, kvh, d)
    if is_quantized(cache):
        k, v = quantize_rows(k), quantize_rows(v)
    elif is_fp8(cache):  # torch copies float8 by index as bytes only
        flat, k, v = (t.view(torch.uint8) for t in (flat, to_fp8(k), to_fp8(v)))
    elif k.dtype != cache.dtype:
        k, v = k.to(cache.dtype), v.to(cache.dtype)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def gather_kv(cache_kv: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache_kv: [NB, BS, KvH, D], block_table: [..., nblk] -> [..., nblk * BS, KvH, D]."""
    if is_fp8(cache_kv):  # torch gathers float8 as bytes only
        return gather_kv(cache_kv.view(torch.uint8), block_table).view(cache_kv.dtype)
    g = cache_kv[block_table]  # [..., nblk, BS, KvH, D]
    return g.flatten(-4, -3)


def _causal_mask(q_len: int, ctx_len: int, window: int | None,
                 device: torch.device) -> torch.Tensor:
    """[q, ctx] bool, True = attend: the chunk's queries are the last q_len positions."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
    k_pos = torch.arange(ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _decode_torch(q: torch.Tensor, cache: torch.Tensor, scale: float, meta: AttentionMetadata,
                  window: int | None, gqa: bool) -> torch.Tensor:
    kc = dequantize_rows(gather_kv(cache[0], meta.decode_block_tables), q.dtype)
    vc = dequantize_rows(gather_kv(cache[1], meta.decode_block_tables), q.dtype)
    kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)  # [B, KvH, L, D]
    mask = meta.decode_mask  # [B, 1, 1, L]
    if window is not None:
        span = torch.arange(mask.shape[-1], device=mask.device)
        first = (meta.decode_context_lens - window)[:, None, None, None]
        mask = mask & (span >= first)
    qd = q.unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask,
                                       scale=scale, enable_gqa=gqa)
    return o.squeeze(2)


def _packed_prefills(meta: AttentionMetadata, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(block_tables [P, max_blocks], q_starts, q_lens, ctx_lens [P]) of this step's
    prefills, int64, built once per step (metadata) and kept on it."""
    packed = meta.__dict__.get("_packed_prefills")
    if packed is None:
        ps = meta.prefills
        width = max(int(p.block_table.numel()) for p in ps)
        tables = torch.zeros(len(ps), width, dtype=torch.long, device=device)
        for i, p in enumerate(ps):
            tables[i, :p.block_table.numel()] = p.block_table
        lens = torch.tensor([[p.q_start, p.q_len, p.ctx_len] for p in ps], dtype=torch.long,
                            device=device).T.contiguous()
        packed = (tables, lens[0], lens[1], lens[2])
        meta.__dict__["_packed_prefills"] = packed
    return packed


def _native_prefill(q: torch.Tensor, cache: torch.Tensor, scale: float,
                    meta: AttentionMetadata, window: int | None, out: torch.Tensor) -> bool:
    """Every prefill of the step through the native kernel (prefill_attention.cpp) into
    `out`, where it applies: CPU, a float32/bfloat16 cache of q's dtype, head_dim a
    multiple of 64. False: the caller runs torch's SDPA instead."""
    ops = current().fused if q.device.type == "cpu" else None
    kernel = getattr(ops, "prefill_attention", None)
    if (kernel is None or cache.dtype != q.dtype or q.dtype not in (torch.float32, torch.bfloat16)
            or q.shape[-1] % 64 or q.stride(-1) != 1):
        return False
    tables, q_starts, q_lens, ctx_lens = _packed_prefills(meta, q.device)
    kernel(q, cache[0], cache[1], tables, q_starts, q_lens, ctx_lens, out, scale, window or 0)
    return True


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    scale: float, meta: AttentionMetadata | None = None,
                    window: int | None = None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KvH, D] for the new tokens -> [T, H, D]. `window`: a
    sliding-window layer's width (None: full causal attention)."""
    if meta is None:
        meta = get_forward_context().attn
    write_kv(cache, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    kernel = current().decode if q.device.type == "cpu" else None  # native decode attention
    native = kernel is not None and (cache.dtype == q.dtype or is_quantized(cache))
    if native and nd == q.shape[0]:  # decodes only (every decode step): no copy into `out`
        return kernel(q, cache[0], cache[1], meta.decode_block_tables,
                      meta.decode_context_lens, scale, window or 0)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    if nd and native:
        out[:nd] = kernel(q[:nd], cache[0], cache[1], meta.decode_block_tables,
                          meta.decode_context_lens, scale, window or 0)
    elif nd:
        out[:nd] = _decode_torch(q[:nd], cache, scale, meta, window, gqa)
    if meta.prefills and _native_prefill(q, cache, scale, meta, window, out):
        return out
    for p in meta.prefills:
        rows = slice(p.q_start, p.q_start + p.q_len)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        windowed = window is not None and p.ctx_len > window
        if p.ctx_len == p.q_len:  # nothing before this chunk: attend to own keys
            ks = k[rows].transpose(0, 1).unsqueeze(0)
            vs = v[rows].transpose(0, 1).unsqueeze(0)
            mask = _causal_mask(p.q_len, p.ctx_len, window, q.device) if windowed else None
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=not windowed,
                                               scale=scale, enable_gqa=gqa)
        else:
            ks = dequantize_rows(gather_kv(cache[0], p.block_table)[:p.ctx_len], q.dtype)
            vs = dequantize_rows(gather_kv(cache[1], p.block_table)[:p.ctx_len], q.dtype)
            ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
            mask = _causal_mask(p.q_len, p.ctx_len, window if windowed else None, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs,
                                               attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def qkv_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                  sin: torch.Tensor, cache: torch.Tensor, scale: float,
                  meta: AttentionMetadata | None = None, window: int | None = None
                  ) -> torch.Tensor:
    """Attention over a fused QKV projection's output: neox rotary on q and k (in place
    where the kernel can), the new keys/values into the cache, then `paged_attention`.

    qkv: [T, (H + 2 KvH) * D] (q heads, k heads, v heads); cos, sin: [T, D] rows of the
    rotary table; window: a sliding-window layer's span (None: all) -> [T, H * D]. A step
    of decodes only (every decode step) on the native
    kernels is one call (yun/kernels/decode_step.cpp), with the same results.
    """
    if meta is None:
        meta = get_forward_context().attn
    T, h, kvh = qkv.shape[0], num_heads, num_kv_heads
    ops = fused.ops_for(qkv)
    if (meta.num_decodes == T and ops is not None and current().decode is not None
            and qkv.is_contiguous() and cos.dim() == 2 and cos.dtype == qkv.dtype
            and (cache.dtype == qkv.dtype or is_quantized(cache))):
        return ops.decode_attention_qkv(qkv, cos, sin, cache, meta.slot_mapping,
                                        meta.decode_block_tables, meta.decode_context_lens,
                                        h, kvh, scale, window or 0)
    heads = qkv.view(T, h + 2 * kvh, -1)  # [T, H + 2 KvH, D]
    q, k = apply_rope_(heads[:, :h + kvh], cos, sin).split([h, kvh], dim=1)
    return paged_attention(q, k, heads[:, h + kvh:], cache, scale, meta,
                           window=window).reshape(T, -1)
