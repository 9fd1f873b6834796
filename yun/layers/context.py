"""Per-step state that attention layers read, set in a scoped context by the runner."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class PrefillSeq:
    """One sequence computing more than one token this step (a prompt or a chunk of it)."""

    q_start: int  # first row of this sequence in the flat token batch
    q_len: int  # tokens computed this step
    ctx_len: int  # tokens in the KV cache after this step (cached prefix + q_len)
    block_table: torch.Tensor  # [ceil(ctx_len / block_size)] block ids (long)


@dataclass
class AttentionMetadata:
    """How the flat token batch maps onto sequences and KV-cache slots.

    The runner orders sequences so that the first `num_decodes` tokens belong to
    sequences computing exactly one token (decodes); each of those is one row.

    A model with sliding and full layers (two KV-cache groups, yun/engine/kv_groups.py):
    this is the full group's view, and `sliding` the sliding layers' (the same
    sequences, lengths and masks; their own slot mapping and block tables).
    """

    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) per token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [B_d, max_blocks]
    decode_context_lens: torch.Tensor | None  # [B_d]
    decode_mask: torch.Tensor | None  # [B_d, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillSeq] = field(default_factory=list)
    sliding: "AttentionMetadata | None" = None  # the sliding group's view (two groups only)

    def for_window(self, window: int | None) -> "AttentionMetadata":
        """The view a layer with this window (None: full attention) reads."""
        return self if window is None or self.sliding is None else self.sliding

    def token_seq_lens(self, num_tokens: int) -> torch.Tensor:
        """[T] (cpu, long): the length each token's sequence reaches at the end of this
        step (read by the length-dependent RoPE scalings)."""
        lens = torch.empty(num_tokens, dtype=torch.long)
        if self.num_decodes:
            lens[:self.num_decodes] = self.decode_context_lens.cpu()
        for p in self.prefills:
            lens[p.q_start:p.q_start + p.q_len] = p.ctx_len
        return lens


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer, shaped as the model's cache spec says


_CTX: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "yun_forward_context", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CTX.get()
    if ctx is None:
        raise RuntimeError("model forward called outside forward_context(...)")
    return ctx
