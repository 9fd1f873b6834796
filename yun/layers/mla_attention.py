"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache.

Each token caches only its compressed latent c (kv_lora_rank L values, after the
kv_a_layernorm) and its rotated shared rope key (R values): one layer's cache is
`[num_blocks, block_size, L + R]`. Head h's key and value are
    k_h = [W_UK[h] c ; k_pe],  v_h = W_UV[h] c,  with kv_b_proj.weight = [W_UK ; W_UV].

- Decodes (one query each, batched) use the absorbed form: q_h . k_h
  = (W_UK[h]^T q_nope_h) . c + q_pe_h . k_pe, so the query moves into latent space and
  attends to the cache as is: multi-query attention with key [c ; k_pe] (L + R) and
  value c (L). The output is lifted per head with W_UV afterwards. Full K/V are never built.
- Prefill chunks (compute-bound) expand K and V for their context and run ordinary
  multi-head attention, one sequence at a time.

Shapes: T = tokens, H = heads, Dn = qk_nope_head_dim, R = qk_rope_head_dim,
Dv = v_head_dim, L = kv_lora_rank, S = context length, B = decode rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yun.layers.context import AttentionMetadata, PrefillSeq, get_forward_context


def write_latent(cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent: [T, L + R] into its slots of cache [NB, BS, L + R]."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent.to(cache.dtype))


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
                  k_pe: torch.Tensor, w_kv_b: torch.Tensor, cache: torch.Tensor, scale: float,
                  meta: AttentionMetadata | None = None) -> torch.Tensor:
    """q_nope: [T, H, Dn], q_pe: [T, H, R] (rotated), kv_c: [T, L], k_pe: [T, R] (rotated),
    w_kv_b: kv_b_proj.weight viewed [H, Dn + Dv, L] -> attention output [T, H, Dv]."""
    if meta is None:
        meta = get_forward_context().attn
    write_latent(cache, torch.cat((kv_c, k_pe), dim=-1), meta.slot_mapping)
    T, H, Dn = q_nope.shape
    Dv = w_kv_b.shape[1] - Dn
    out = q_nope.new_empty(T, H, Dv)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_absorbed(q_nope[:nd], q_pe[:nd], w_kv_b, cache, meta, scale)
    for p in meta.prefills:
        rows = slice(p.q_start, p.q_start + p.q_len)
        if p.ctx_len == p.q_len:  # nothing cached before this chunk: use its own latents
            c, kpe = kv_c[rows], k_pe[rows]
        else:
            c, kpe = _gather(cache, p.block_table)[:p.ctx_len].split(
                [kv_c.shape[-1], k_pe.shape[-1]], dim=-1)  # [S, L], [S, R]
        out[rows] = _prefill_expanded(q_nope[rows], q_pe[rows], c, kpe, w_kv_b, p, scale)
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache: [NB, BS, L + R], block_table: [..., nblk] -> [..., nblk * BS, L + R]."""
    return cache[block_table].flatten(-3, -2)


def _decode_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, w_kv_b: torch.Tensor,
                     cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per row, against the latent cache -> [B, H, Dv]."""
    Dn = q_nope.shape[-1]
    w_uk, w_uv = w_kv_b[:, :Dn], w_kv_b[:, Dn:]  # [H, Dn, L], [H, Dv, L]
    L = w_kv_b.shape[-1]
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, L]
    # The H heads share one key/value head, so they ride on the query-length axis.
    q = torch.cat((q_lat, q_pe), dim=-1).unsqueeze(1)  # [B, 1, H, L + R]
    kv = _gather(cache, meta.decode_block_tables).unsqueeze(1).to(q.dtype)  # [B, 1, S, L + R]
    o = F.scaled_dot_product_attention(q, kv, kv[..., :L], attn_mask=meta.decode_mask,
                                       scale=scale)  # [B, 1, H, L]; mask [B, 1, 1, S]
    o = torch.bmm(o.squeeze(1).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B, Dv]
    return o.transpose(0, 1)


def _prefill_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor,
                      k_pe: torch.Tensor, w_kv_b: torch.Tensor, p: PrefillSeq,
                      scale: float) -> torch.Tensor:
    """q_*: [q, H, *] for one sequence; c: [S, L], k_pe: [S, R] its context -> [q, H, Dv]."""
    H, Dn = q_nope.shape[1], q_nope.shape[2]
    S = c.shape[0]
    kv = F.linear(c.to(q_nope.dtype), w_kv_b.flatten(0, 1)).view(S, H, -1)  # [S, H, Dn + Dv]
    k_nope, v = kv[..., :Dn], kv[..., Dn:]
    k = torch.cat((k_nope, k_pe.to(k_nope.dtype)[:, None, :].expand(S, H, -1)), dim=-1)
    q = torch.cat((q_nope, q_pe), dim=-1)  # [q, H, Dn + R]
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, *, *]
    if S == p.q_len:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(S - p.q_len, S, device=q.device)
        mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # [q, S]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.squeeze(0).transpose(0, 1)  # [q, H, Dv]
