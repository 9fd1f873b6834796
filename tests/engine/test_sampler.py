"""The sampler on hand-made logits: draws follow the distribution, filters hold."""

from __future__ import annotations

import pytest
import torch

from yun.engine.sampler import Sampler, SamplingRow, _draw
from yun.sampling_params import SamplingParams


def row(seed: int = 0, prompt=(), output=(), **params) -> SamplingRow:
    p = SamplingParams(**params)
    g = torch.Generator().manual_seed(seed)
    return SamplingRow(p, None if p.greedy else g, list(prompt), list(output))


def test_two_level_draw_follows_the_distribution():
    V = 1000  # not a multiple of the chunk: exercises padding
    probs = torch.rand(V) ** 4
    probs[::7] = 0
    probs /= probs.sum()
    g = torch.Generator().manual_seed(0)
    n = 60000
    counts = torch.zeros(V)
    for _ in range(n // 500):
        ids = _draw(probs.expand(500, V).contiguous(), [g] * 500)
        counts += torch.bincount(ids, minlength=V).float()
    assert counts[::7].sum() == 0  # impossible tokens never drawn
    expected = probs * n
    big = expected > 50
    rel = ((counts[big] - expected[big]).abs() / expected[big].sqrt()).max()
    assert rel < 5.0  # every frequent token within 5 standard deviations


def test_greedy_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    s = Sampler()
    seen = [set() for _ in range(4)]
    for seed in range(200):
        rows = [row(temperature=0), row(seed, temperature=1.0, top_k=2),
                row(seed, temperature=1.0, top_p=0.7), row(seed, temperature=1.0, min_p=0.35)]
        toks, _ = s(logits.clone(), rows)
        for i, t in enumerate(toks):
            seen[i].add(t)
    assert seen[0] == {0}
    assert seen[1] == {0, 1}
    assert seen[2] == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: token 2 is cut
    assert seen[3] == {0, 1}  # 0.15 < 0.35 * 0.5


def test_penalties_and_logprobs():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    s = Sampler()
    toks, _ = s(logits.clone(), [row(temperature=0, output=[0], presence_penalty=0.5)])
    assert toks == [1]
    toks, _ = s(logits.clone(), [row(temperature=0, prompt=[0], repetition_penalty=2.0)])
    assert toks == [1]  # 2.0 / 2 = 1.0 < 1.9
    toks, lps = s(logits.clone(), [row(temperature=0, logprobs=2)])
    ref = logits.log_softmax(-1)[0]
    assert toks == [0] and set(lps[0]) == {0, 1}
    assert abs(lps[0][0].logprob - ref[0].item()) < 1e-6 and lps[0][1].rank == 2


def test_logit_bias_moves_only_its_rows_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias={0: 5.0, 3: -100.0}),
                        None, [1], []),
            SamplingRow(SamplingParams(temperature=0), None, [1], [])]
    tokens, _ = Sampler()(logits, rows)
    assert tokens == [0, 3]
    assert logits[0].tolist() == [0.0, 1.0, 2.0, 3.0]  # the caller's logits are not changed
    for bad in ({-1: 1.0}, {2: 100.5}, {2: float("nan")}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
