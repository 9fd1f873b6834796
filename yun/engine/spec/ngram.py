"""N-gram (prompt lookup) proposer: no model, only the request's own tokens.

The last n tokens (n from `max_n` down to `min_n`) are looked up among the earlier
tokens of the prompt and the output; the tokens that followed their most recent earlier
occurrence are the proposal. It pays when the output copies the input (edits of a given
text, answers quoting a document, JSON over given fields).

Each request keeps an index {n-gram: position after its latest occurrence}, extended as
tokens arrive (tokens are only ever appended), so a proposal costs O(max_n) per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from yun.engine.request import Request


@dataclass
class _Index:
    num_indexed: int = 0  # n-grams ending before this position are indexed
    last: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> next position


class NgramProposer:
    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _Index] = {}

    def propose(self, req: Request, k: int) -> list[int]:
        """Up to `k` tokens that may follow the request's tokens (fewer, or none, when the
        last n-gram was not seen before)."""
        if k <= 0:
            return []
        tokens = req.all_token_ids
        idx = self._extend(req.request_id, tokens)
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            pos = idx.last.get(tuple(tokens[L - n:]))
            if pos is not None:
                return tokens[pos:pos + k]
        return []

    def _extend(self, request_id: str, tokens: list[int]) -> _Index:
        """Index every n-gram that ends before the last token (its continuation is known)."""
        idx = self._index.setdefault(request_id, _Index())
        for end in range(max(idx.num_indexed, 1), len(tokens)):  # n-gram = tokens[end-n:end]
            for n in range(self.min_n, min(self.max_n, end) + 1):
                idx.last[tuple(tokens[end - n:end])] = end
        idx.num_indexed = max(idx.num_indexed, len(tokens))
        return idx

    def release(self, request_id: str) -> None:
        self._index.pop(request_id, None)
