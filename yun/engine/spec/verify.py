"""Verification of proposed tokens against the target model, in one forward pass.

A request with k proposals d_0..d_{k-1} computes k + 1 tokens in the step: its last
committed token, then the proposals. Row j of its logits is the target's distribution
after the proposals before j; the runner samples one token y_j from every row (with the
request's penalties, filters and grammar mask at that position, and the noise of that
output position: `seed_for_position`). Then

    committed = y_0 .. y_m, where m = the first j with y_j != d_j (or k: all accepted)

Greedy: y_j is the argmax, so the output is the target's greedy output token for token.
Sampling: this is rejection sampling for a proposer whose proposal is deterministic (its
distribution q is a point mass on d_j): the draft is accepted with probability p(d_j) =
min(1, p/q), and on rejection the token is distributed as p without d_j, renormalised
(the residual max(0, p - q)). Every committed token is a draw from the target
distribution of its position, so the output distribution is exactly the non-speculative
one; and since the noise belongs to the output position, not to the step, a seeded
request gives the same tokens with speculation on or off, whatever shares the batch.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def accepted_prefix(draft: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verification commits: sampled[0..m] (len(sampled) == len(draft) + 1)."""
    for j, d in enumerate(draft):
        if sampled[j] != d:
            return sampled[:j + 1]
    return sampled[:len(draft) + 1]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seed_for_position(seed: int, position: int) -> int:
    """The seed of the noise that draws output token `position` of a request seeded with
    `seed` (a 63-bit integer, distinct per (seed, position) pair in practice)."""
    return _splitmix64(_splitmix64(seed) ^ position) >> 1
