"""Logits -> next tokens, one batched pass with per-request settings.

Order: raw logprobs (reported as the model's distribution) -> logit_bias -> penalties -> min_tokens
mask -> grammar mask (guided rows only, yun/engine/guided.py) -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> draw with the request's own generator (so a
seed gives the same tokens whatever shares the batch).
Shapes: B = requests sampled this step, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from yun.outputs import Logprob, PositionLogprobs
from yun.sampling_params import SamplingParams

if TYPE_CHECKING:
    from yun.engine.guided import GrammarState


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    grammar: "GrammarState | None" = None  # guided decoding: the request's matcher
    # Speculative rows: the grammar's bitmask at this row's position, filled ahead
    # ([ceil(V / 32)] int32, GrammarState.masks_along); None: fill from `grammar`.
    grammar_mask: torch.Tensor | None = None


def _penalize(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition (prompt + output), presence and frequency (output) penalties, in place."""
    B, V = logits.shape
    dev = logits.device
    for i, row in enumerate(rows):
        p = row.params
        if not p.needs_penalties:
            continue
        if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(row.output_token_ids, device=dev),
                                    minlength=V)[:V].to(logits.dtype)  # [V]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_token_ids + row.output_token_ids, device=dev)
            seen = seen[seen < V].unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                          vals * p.repetition_penalty)


def _bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """logit_bias: add each request's biases to its row, in place."""
    V = logits.shape[1]
    for i, row in enumerate(rows):
        bias = {t: b for t, b in (row.params.logit_bias or {}).items() if t < V}
        if bias:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), device=logits.device,
                                           dtype=logits.dtype)


def _mask_early_stop(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Before min_tokens outputs, EOS and stop token ids cannot be picked."""
    for i, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(p._eos_token_ids))
            banned = [t for t in banned if t < logits.shape[1]]
            if banned:
                logits[i, banned] = float("-inf")


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p over the sampled rows -> probabilities [B, V]."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=dev)
    logits = logits / temps.unsqueeze(1)
    top_k = [r.params.top_k for r in rows]
    if any(top_k):
        V = logits.shape[1]
        k = torch.tensor([t if t else V for t in top_k], device=dev).clamp(max=V)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # [B,1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = (cum - sorted_logits.softmax(-1)) >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
    if bool((min_p > 0).any()):
        keep = probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
    return probs


def _logprob_entry(raw: torch.Tensor, token: int, n: int, decode=None) -> PositionLogprobs:
    """raw: [V] log-probabilities -> {token: Logprob} for the chosen token and the top-n."""
    chosen = float(raw[token])
    entry: PositionLogprobs = {}
    if n > 0:
        vals, ids = raw.topk(n)
        for rank, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
            entry[t] = Logprob(v, rank)
    if token not in entry:
        entry[token] = Logprob(chosen, int((raw > chosen).sum()) + 1)
    return entry


def logprobs_for(raw: torch.Tensor, tokens: list[int], n: int) -> list[PositionLogprobs]:
    """raw: [N, V] log-probabilities, tokens: [N] chosen ids."""
    return [_logprob_entry(raw[i], t, n) for i, t in enumerate(tokens)]


DRAW_CHUNK = 256  # vocabulary chunk size of the two-level draw


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Exact categorical draw, robust to tiny numeric noise, with one generator per row.

    Two-level exponential race: pick a vocabulary chunk with probability proportional to
    its mass (argmax mass / Exp(1) noise), then a token inside it (argmax p / Exp(1)).
    Unlike inverse-CDF sampling, no decision depends on a running sum over the whole
    vocabulary, so a last-bit difference in the logits (another batch composition)
    almost never changes the pick; and each row needs only C + 256 random numbers
    instead of one per vocabulary entry. probs: [B, V], unnormalised -> ids [B].
    """
    B, V = probs.shape
    C = -(-V // DRAW_CHUNK)
    if C * DRAW_CHUNK != V:
        probs = torch.nn.functional.pad(probs, (0, C * DRAW_CHUNK - V))
    blocks = probs.view(B, C, DRAW_CHUNK)
    noise = torch.stack([torch.rand(C + DRAW_CHUNK, generator=g, device=probs.device)
                         for g in generators])  # [B, C + S] uniform in [0, 1)
    expo = (-torch.log1p(-noise)).clamp_min_(1e-30)  # Exp(1)
    chunk = (blocks.sum(-1) / expo[:, :C]).argmax(-1)  # [B]
    inner = blocks[torch.arange(B, device=probs.device), chunk]  # [B, S]
    tok = (inner / expo[:, C:]).argmax(-1)
    return (chunk * DRAW_CHUNK + tok).clamp_(max=V - 1)


def _plain_greedy(row: SamplingRow) -> bool:
    """Greedy with nothing that changes or reports the distribution: the argmax is all."""
    p = row.params
    return (p.greedy and p.logprobs is None and not p.needs_penalties and not p.logit_bias
            and row.grammar is None and len(row.output_token_ids) >= p.min_tokens)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]
                 ) -> tuple[list[int], list[PositionLogprobs | None]]:
        """logits: [B, V] float32 -> (token per row, logprobs entry per row or None)."""
        if all(_plain_greedy(r) for r in rows):  # the common decode step: argmax only
            return logits.argmax(dim=-1).tolist(), [None] * len(rows)
        want_lp = [r.params.logprobs is not None for r in rows]
        raw = logits.log_softmax(-1) if any(want_lp) else None  # [B, V]
        if any(r.params.logit_bias for r in rows):
            logits = logits.clone()
            _bias(logits, rows)
        if any(r.params.needs_penalties for r in rows):
            logits = logits.clone()
            _penalize(logits, rows)
        if any(len(r.output_token_ids) < r.params.min_tokens for r in rows):
            logits = logits.clone()
            _mask_early_stop(logits, rows)
        if any(r.grammar is not None for r in rows):  # guided decoding: in place
            from yun.engine.guided import apply_grammar_masks

            apply_grammar_masks(logits, rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(greedy) == len(rows):
            tokens = logits.argmax(dim=-1)
        elif greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if sampled:
            sub = logits if len(sampled) == len(rows) else logits[sampled]
            probs = _filter(sub, [rows[i] for i in sampled])
            drawn = _draw(probs, [rows[i].generator for i in sampled])
            if len(sampled) == len(rows):
                tokens = drawn
            else:
                tokens[sampled] = drawn
        token_list = tokens.tolist()
        lps: list[PositionLogprobs | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if want_lp[i]:
                lps[i] = _logprob_entry(raw[i], token_list[i], r.params.logprobs)
        return token_list, lps
