"""DeepSeek-V3 MTP proposer: the target's own multi-token-prediction layer
(yun/models/deepseek_mtp.py) guesses the next tokens from the target's last hidden state.

The MTP layer attends over its own cache of earlier positions, so it must see every
position the target computes: after each target step it takes the hidden states of the
positions the step kept (`ModelRunner.keep_hidden`; rejected proposals' rows dropped);
at the next proposal, when the token after each of them is known, one forward catches
every request up (MTP position i = (h_i, t_{i+1})). Its output at the last known position
L-2 predicts t_L, the first proposal; further proposals chain the layer on its own output
(its g in place of the target's h, as vLLM does for more tokens than MTP layers), and
those chained positions are dropped from its cache right away (the real h replaces them).

Shapes: T = tokens, E = hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from yun.config import EngineConfig
from yun.engine.request import Request
from yun.engine.runner import ModelRunner
from yun.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from yun.engine.spec.draft import SHORT_FORWARD, _ema
from yun.engine.spec.shadow import ShadowSequences
from yun.layers.backend import use_backend
from yun.layers.context import ForwardContext, forward_context
from yun.models.deepseek_mtp import DeepseekV3MTP, load_mtp


@dataclass
class _Pending:
    """Target hidden states not yet in the MTP cache: positions first .. first + n - 1."""

    first: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)  # each [n_i, E]

    @property
    def end(self) -> int:
        return self.first + sum(r.shape[0] for r in self.rows)


class MTPProposer:
    def __init__(self, target: ModelRunner, mtp: DeepseekV3MTP, num_blocks: int):
        self.target = target
        self.mtp = mtp
        target.keep_hidden = True
        self.shadows = ShadowSequences(num_blocks, target.block_size)
        self.cache = torch.zeros(mtp.kv_cache_shape(num_blocks, target.block_size),
                                 dtype=target.dtype, device=target.device)
        self.pending: dict[str, _Pending] = {}
        self.requests: dict[str, Request] = {}
        self.num_forwards = 0
        self.seconds_per_position = 0.0  # a forward of a few tokens per sequence (EMA)

    # ---- after each target step: keep the kept positions' hidden states ---------------
    def observe_step(self, sched: SchedulerOutput, result: RunnerOutput) -> None:
        if self.target.last_hidden is None:
            return
        hidden, inp = self.target.last_hidden
        self.target.last_hidden = None
        for s, q0 in zip(inp.order, inp.q_starts):
            rid = s.request.request_id
            kept = s.num_new_tokens
            if s.draft_token_ids:
                kept -= len(s.draft_token_ids) - (len(result.sampled.get(rid) or [None]) - 1)
            p = self.pending.setdefault(rid, _Pending())
            self.requests[rid] = s.request
            if not p.rows:
                sh = self.shadows.seqs.get(rid)
                p.first = sh.num_computed_tokens if sh is not None else 0
            skip = p.end - s.start  # recomputed after a preemption: already seen
            if skip < 0:  # a gap (should not happen): start this request over
                self.release(rid)
                continue
            if skip < kept:
                p.rows.append(hidden[q0 + skip:q0 + kept].clone())

    # ---- proposals ---------------------------------------------------------------------
    def propose(self, req: Request, k: int) -> list[int]:
        return self.propose_batch([req], [k])[0]

    @torch.inference_mode()
    def propose_batch(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        wanted = {r.request_id: k for r, k in zip(reqs, ks) if k > 0}
        last = self._catch_up()  # request id -> g at its last known position
        out: dict[str, list[int]] = {}
        chain = []  # (shadow, g, k) of requests whose first proposal came in
        for rid, k in wanted.items():
            g = last.get(rid)
            if g is None or self.shadows.seqs[rid].num_computed_tokens != \
                    self.requests[rid].num_tokens - 1:
                continue
            out[rid] = [int(self._logits(g[None]).argmax(-1))]
            chain.append((self.shadows.seqs[rid], g, k))
        for j in range(1, max((k for *_, k in chain), default=0)):
            chain = [c for c in chain if c[2] > j and self.shadows.kv.allocate(c[0], 1)]
            if not chain:
                break
            for sh, _, _ in chain:  # the guessed token becomes known to its shadow
                sh.output_token_ids.append(out[sh.request_id][-1])
            g = self._forward([ScheduledRequest(sh, 1, sh.num_computed_tokens)
                               for sh, _, _ in chain], torch.stack([c[1] for c in chain]))
            tokens = self._logits(g).argmax(-1).tolist()
            chain = [(sh, g[i], k) for i, (sh, _, k) in enumerate(chain)]
            for (sh, _, _), t in zip(chain, tokens):
                out[sh.request_id].append(t)
        for rid in wanted:  # chained positions are not real: roll them back now
            if rid in self.shadows.seqs:
                self.shadows.sync(self.requests[rid])
        return [out.get(r.request_id, []) for r in reqs]

    def _catch_up(self) -> dict[str, torch.Tensor]:
        """One forward over every request's pending positions -> its last row's g."""
        batch, rows = [], []
        for rid, p in list(self.pending.items()):
            if not p.rows:
                continue
            req = self.requests[rid]
            sh = self.shadows.sync(req)
            if sh.num_computed_tokens != p.first or p.end > req.num_tokens - 1 or \
                    not self.shadows.kv.allocate(sh, p.end - p.first):
                continue  # not contiguous, its next token unknown, or no room: later
            batch.append(ScheduledRequest(sh, p.end - p.first, p.first))
            rows.append(torch.cat(p.rows))
            p.rows = []
        if not batch:
            return {}
        g = self._forward(batch, torch.cat(rows))
        last, at = {}, 0
        for s in batch:
            at += s.num_new_tokens
            last[s.request.request_id] = g[at - 1]
        return last

    def _forward(self, batch: list[ScheduledRequest], hidden: torch.Tensor) -> torch.Tensor:
        """The MTP layer over `batch` (shadow positions start .. start + n - 1, rows of
        `hidden` [T, E] in batch order) -> g [T, E] in batch order; advances the shadows."""
        t0 = time.perf_counter()
        inp = self.target.prepare(SchedulerOutput(batch))  # decodes first: reorder rows
        pos = {id(s): i for i, s in enumerate(batch)}
        starts, at = [], 0
        for s in batch:
            starts.append(at)
            at += s.num_new_tokens
        order = [pos[id(s)] for s in inp.order]
        idx = torch.cat([torch.arange(starts[i], starts[i] + batch[i].num_new_tokens)
                         for i in order]).to(hidden.device)
        next_ids = torch.tensor([t for i in order for t in batch[i].request.token_ids_slice(
            batch[i].start + 1, batch[i].start + 1 + batch[i].num_new_tokens)],
            dtype=torch.long, device=hidden.device)  # t_{i+1} at MTP position i
        embeds = self.target.model.model.embed_tokens(next_ids)  # [T, E]
        with use_backend(self.target.backend), forward_context(ForwardContext(inp.attn,
                                                                              [self.cache])):
            g = self.mtp(embeds, hidden[idx], inp.positions)  # [T, E], inp order
        self.num_forwards += 1
        if all(s.num_new_tokens <= SHORT_FORWARD for s in batch):
            self.seconds_per_position = _ema(self.seconds_per_position,
                                             time.perf_counter() - t0)
        for s in batch:
            s.request.num_computed_tokens = s.start + s.num_new_tokens
        back = torch.empty_like(idx)
        back[idx] = torch.arange(idx.shape[0], device=idx.device)
        return g[back]

    def _logits(self, g: torch.Tensor) -> torch.Tensor:
        with use_backend(self.target.backend):
            return self.target.model.compute_logits(self.mtp.shared_head.norm(g))  # [n, V]

    def release(self, request_id: str) -> None:
        self.shadows.release(request_id)
        self.pending.pop(request_id, None)
        self.requests.pop(request_id, None)


def build_mtp_proposer(config: EngineConfig, target: ModelRunner,
                       target_capacity: int) -> MTPProposer:
    """Load the target checkpoint's MTP layer beside it (same dtype, device, kernels)."""
    mtp = load_mtp(target.model_config, target.dtype, target.device, config.quantization)
    room = config.max_num_seqs * (config.num_speculative_tokens + config.block_size)
    num_blocks = -(-(target_capacity + room) // config.block_size)
    return MTPProposer(target, mtp, num_blocks)
