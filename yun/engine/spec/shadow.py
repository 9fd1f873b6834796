"""A proposer model's own view of the requests: one shadow sequence per request, in the
proposer's own KV cache (a `KVCacheManager` of its own, no prefix caching).

A shadow holds the request's tokens plus the ones the proposer guessed after them, and
how many of those are in its cache. Before each proposal it is synced to the request:
its tokens are cut back to the longest common prefix with the request's (the proposals
verification rejected go, the accepted ones stay, computed), the cache counter with
them, and the blocks past it go back (`free_tail`): the rollback to the accepted length.
"""

from __future__ import annotations

from yun.engine.kv_cache import KVCacheManager
from yun.engine.request import Request
from yun.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0)  # proposers guess the most likely token


class ShadowSequences:
    def __init__(self, num_blocks: int, block_size: int):
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.seqs: dict[str, Request] = {}

    def sync(self, req: Request) -> Request:
        """The shadow of `req`, its tokens = req's, at most req.num_tokens - 1 of them
        computed (the last one's output is what the proposer needs)."""
        sh = self.seqs.get(req.request_id)
        if sh is None:
            sh = Request(req.request_id, req.prompt_token_ids, _GREEDY,
                         max_tokens=1 << 30, seed=0)
            self.seqs[req.request_id] = sh
        mine, theirs = sh.output_token_ids, req.output_token_ids
        same = 0
        for a, b in zip(mine, theirs):
            if a != b:
                break
            same += 1
        del mine[same:]
        mine.extend(theirs[same:])
        sh.num_computed_tokens = min(sh.num_computed_tokens, req.num_prompt_tokens + same,
                                     req.num_tokens - 1)
        self.kv.free_tail(sh)
        return sh

    def release(self, request_id: str) -> None:
        sh = self.seqs.pop(request_id, None)
        if sh is not None:
            self.kv.free_request(sh)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks
