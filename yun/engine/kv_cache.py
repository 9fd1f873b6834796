"""Paged KV-cache bookkeeping: a block allocator with automatic prefix caching.

No tensors live here (the runner owns them); this module decides which block ids a
request writes to. Full blocks are named by a hash chain of their tokens, so a new
request whose prompt starts with the same tokens reuses them. Blocks are reference
counted; a block whose count drops to zero goes back to the free queue but keeps its
hash, so it can still be reused until the allocator evicts it (least recently freed
first).

Sliding windows: when every attention layer of the model slides over the last W
positions (Mistral-style; `sliding_window`), a request's blocks that lie wholly before
its next query's window are given back after each step, and its block table keeps
`FREED` in their place (positions stay block-table indices; no kernel reads them: the
native decode kernel starts at the window, the torch path masks them).

KV-cache groups (as vLLM's hybrid KV-cache manager): a model where only some layers
slide (Qwen2's max_window_layers, layer_types) gets a `HybridKVCacheManager`, two pools
over the same block size: the "full" group (`req.block_ids`, every block kept; the
full-attention layers' caches) and the "sliding" group (`req.window_block_ids`, blocks
outside the widest window W freed as above; the sliding layers' caches, sized by the
runner for the most blocks the windows can hold). Both tables always have the same
length (one entry per block of positions), allocation takes both or neither, and every
release covers both. A prefix-cache hit of n full blocks counts only when the sliding
group still holds (cached) the blocks of the last W positions before the hit point.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from yun.engine.request import Request

BlockHash = bytes
FREED = -1  # a block-table entry whose block went back (outside every layer's window)


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Name a full block by its tokens and everything before it (the parent's name)."""
    h = hashlib.blake2b(parent or b"root", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, table: str = "block_ids"):
        """`sliding_window`: the window W of the layers this pool serves when they all
        slide (None: some or all attend to everything, and every block is kept).
        `table`: the Request attribute holding this pool's block table (a second group's
        pool keeps its own: "window_block_ids")."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        self.sliding_window = sliding_window
        self.table = table
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        # Free blocks in eviction order (front = evicted first). Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}
        # Per request: hashes of its full blocks, computed as tokens become known.
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(self.num_blocks, len(self.free), self.prefix_queries,
                            self.prefix_hits)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _table(self, req: Request) -> list[int]:
        return req.block_ids if self.table == "block_ids" else getattr(req, self.table)

    def _hashes(self, req: Request) -> list[BlockHash]:
        """Hashes of every full block of the request's known tokens (extended lazily)."""
        hashes = self._req_hashes.setdefault(req.request_id, [])
        tokens = req.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens.

        At least one token is always left to compute (the model must produce logits
        for the last one). Requests that want prompt logprobs compute everything.
        """
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        hits: list[int] = []
        for h in self._hashes(req):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= req.num_tokens:
            hits.pop()
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache lookup (for the hit rate)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    # ---- allocation ----------------------------------------------------------------
    def _need(self, req: Request, num_new_tokens: int, cached_blocks: list[int]) -> int | None:
        """New blocks `allocate` would take, or None when too few are free."""
        have = len(self._table(req)) + len(cached_blocks)
        total = req.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need = max(0, self.blocks_needed(total) - have)
        free_cached = sum(1 for b in cached_blocks if b != FREED and self.ref_counts[b] == 0)
        return None if need > len(self.free) - free_cached else need

    def can_allocate(self, req: Request, num_new_tokens: int,
                     cached_blocks: list[int] = ()) -> bool:
        """Whether `allocate` with these arguments would succeed (changes nothing)."""
        return self._need(req, num_new_tokens, list(cached_blocks)) is not None

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens after its computed ones.

        `cached_blocks` (from find_cached_prefix, first admission only) are shared, not
        allocated (a sliding group's may hold FREED: blocks outside the window). Returns
        False, changing nothing, when too few blocks are free.
        """
        cached_blocks = list(cached_blocks)
        need = self._need(req, num_new_tokens, cached_blocks)
        if need is None:
            return False
        table = self._table(req)
        for b in cached_blocks:
            if b == FREED:
                continue
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        table.extend(cached_blocks)
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            table.append(b)
        return True

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's computed full blocks under their hashes."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes(req)
        table = self._table(req)
        n_full = min(req.num_computed_tokens // self.block_size, len(hashes), len(table))
        for i in range(n_full):
            block = table[i]
            if block == FREED or self.block_hash[block] is not None:
                continue
            h = hashes[i]
            if h not in self.cached:  # a twin computed by another request keeps the name
                self.cached[h] = block
                self.block_hash[block] = h

    def free_tail(self, req: Request) -> None:
        """Give back the request's blocks past its computed tokens and the next one
        (rejected speculative tokens held them); they are uncached, so reused first."""
        keep = self.blocks_needed(req.num_computed_tokens + 1)
        table = self._table(req)
        while len(table) > keep:
            b = table.pop()
            if b == FREED:
                continue
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._evict(b)
                self.free[b] = None
                self.free.move_to_end(b, last=False)

    def free_outside_window(self, req: Request) -> int:
        """With a sliding window W: give back the request's blocks that no query from
        its next position on can see (every key before next - W + 1), leaving FREED in
        the block table. Returns how many went back."""
        if self.sliding_window is None:
            return 0
        first_seen = req.num_computed_tokens - self.sliding_window + 1
        freed = 0
        table = self._table(req)
        for i in range(min(max(0, first_seen) // self.block_size, len(table))):
            b = table[i]
            if b != FREED:
                table[i] = FREED
                self._release(b)
                freed += 1
        return freed

    def num_live_blocks(self, req: Request) -> int:
        """Blocks the request holds (its block table less the FREED entries)."""
        return sum(1 for b in self._table(req) if b != FREED)

    def _release(self, b: int) -> None:
        """Drop one reference; a block nobody holds goes back to the free queue (an
        uncached one first in line: it is worthless)."""
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            self.free[b] = None
            if self.block_hash[b] is None:
                self.free.move_to_end(b, last=False)

    def free_request(self, req: Request) -> None:
        """Release the request's blocks; its last blocks are evicted first."""
        table = self._table(req)
        for b in reversed(table):
            if b != FREED:
                self._release(b)
        table.clear()
        self._req_hashes.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for b in list(self.free):
            self._evict(b)
