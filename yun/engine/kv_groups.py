"""KV-cache groups for a model where only some layers slide (Qwen2's max_window_layers,
layer_types mixing "sliding_attention" and "full_attention").

One block table cannot serve both kinds of layer: the full-attention layers need every
block, the sliding ones only the last W positions. So the layers form two groups, each
with its own pool (a `KVCacheManager`) and its own per-layer cache tensors (the runner's,
sized for that pool): the full group's table is `req.block_ids`, the sliding group's
`req.window_block_ids`, whose blocks before the window are given back after each step
(FREED in the table). Both tables have one entry per block of positions, so they stay the
same length. `HybridKVCacheManager` offers the scheduler the single manager's interface:

- allocate takes blocks in both pools or in neither;
- free_request (finish, abort, preemption) and free_tail (rejected proposals) cover both;
- free_outside_window frees the sliding group's;
- a prefix-cache hit is a list of (full block, sliding block) pairs: n full blocks count
  only when the sliding pool still holds (cached) the blocks of the last W positions
  before the hit point, so the longest such n is taken (the earlier sliding entries are
  FREED: no layer reads them).

Capacity (max_model_len) and the stats are the full group's.
"""

from __future__ import annotations

from yun.engine.kv_cache import FREED, KVCacheManager, KVCacheStats
from yun.engine.request import Request

HitPair = tuple[int, int]  # (full-group block, sliding-group block or FREED)


class HybridKVCacheManager:
    def __init__(self, num_blocks: int, num_window_blocks: int, block_size: int,
                 window: int, enable_prefix_caching: bool = True):
        """`num_blocks` in the full group, `num_window_blocks` in the sliding one, whose
        blocks before the last `window` positions (the widest window) go back."""
        self.full = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.sliding = KVCacheManager(num_window_blocks, block_size, enable_prefix_caching,
                                      sliding_window=window, table="window_block_ids")
        self.sliding._req_hashes = self.full._req_hashes  # one hash chain per request
        self.window = window
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

    # ---- what the engine and the scheduler read --------------------------------------
    @property
    def sliding_window(self) -> None:
        """The full group keeps every block (the sliding group's window: `window`)."""
        return None

    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free_blocks

    @property
    def prefix_queries(self) -> int:
        return self.full.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.full.prefix_hits

    def stats(self) -> KVCacheStats:
        return self.full.stats()

    def blocks_needed(self, num_tokens: int) -> int:
        return self.full.blocks_needed(num_tokens)

    def num_live_blocks(self, req: Request) -> int:
        """Full-group blocks the request holds (the sliding group's: sliding.num_live_blocks)."""
        return self.full.num_live_blocks(req)

    # ---- prefix caching ------------------------------------------------------------
    def find_cached_prefix(self, req: Request) -> list[HitPair]:
        """The longest cached prefix both groups can serve, as (full, sliding) pairs."""
        full_hits = self.full.find_cached_prefix(req)
        if not full_hits:
            return []
        hashes = self.full._hashes(req)
        cached = self.sliding.cached
        bs, w = self.block_size, self.window
        for n in range(len(full_hits), 0, -1):
            first = max(0, n * bs - w + 1) // bs  # the block of the first key still seen
            window = [cached.get(hashes[i]) for i in range(first, n)]
            if None not in window:
                return list(zip(full_hits[:n], [FREED] * first + window))
        return []

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.full.record_lookup(num_tokens, num_hit_tokens)

    def cache_full_blocks(self, req: Request) -> None:
        self.full.cache_full_blocks(req)
        self.sliding.cache_full_blocks(req)

    def reset_prefix_cache(self) -> None:
        self.full.reset_prefix_cache()
        self.sliding.reset_prefix_cache()

    # ---- allocation ----------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int,
                 cached_blocks: list[HitPair] = ()) -> bool:
        """Blocks for `num_new_tokens` more tokens in both groups, or (False) in neither."""
        full_hits = [f for f, _ in cached_blocks]
        window_hits = [s for _, s in cached_blocks]
        if not (self.full.can_allocate(req, num_new_tokens, full_hits)
                and self.sliding.can_allocate(req, num_new_tokens, window_hits)):
            return False
        ok = self.full.allocate(req, num_new_tokens, full_hits)
        ok = self.sliding.allocate(req, num_new_tokens, window_hits) and ok
        assert ok, "checked above"
        return True

    def free_tail(self, req: Request) -> None:
        self.full.free_tail(req)
        self.sliding.free_tail(req)

    def free_outside_window(self, req: Request) -> int:
        return self.sliding.free_outside_window(req)

    def free_request(self, req: Request) -> None:
        self.full.free_request(req)
        self.sliding.free_request(req)
