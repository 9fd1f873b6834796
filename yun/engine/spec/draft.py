"""Draft-model proposer: a smaller model with the target's tokenizer guesses the next
tokens greedily, on its own model runner and KV cache (spec/shadow.py).

Each step, for the requests that propose: one forward catches every shadow up on the
request's tokens not yet in its cache (the accepted proposals of the last step are
already there; after a long prompt this is its prefill, in chunks of the step budget),
its last row gives the first proposal; then k - 1 one-token decode steps, batched over
the requests that still propose, give the rest. The cost (draft seconds per step) is
measured by the speculator and weighed by the controller.
"""

from __future__ import annotations

import time
from dataclasses import replace

from yun.config import EngineConfig, ModelConfig
from yun.engine.request import Request
from yun.engine.runner import ModelRunner
from yun.engine.scheduler import ScheduledRequest, SchedulerOutput
from yun.engine.spec.shadow import ShadowSequences
from yun.model_source import resolve_model
from yun.tokenizer import Tokenizer

SHORT_FORWARD = 8  # tokens per sequence up to which a forward counts as a proposal's cost
COST_DECAY = 0.3  # weight of the newest forward in seconds_per_position
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912; {\"a\": [1]}"


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, num_blocks: int, max_model_len: int,
                 max_batched_tokens: int, target_vocab: int):
        self.runner = runner
        self.shadows = ShadowSequences(num_blocks, runner.block_size)
        self.max_model_len = max_model_len  # the draft's context (positions it can take)
        self.max_batched_tokens = max_batched_tokens  # tokens per catch-up forward
        self.target_vocab = target_vocab
        self.num_forwards = 0  # draft forward passes so far
        self.seconds_per_position = 0.0  # a forward of a few tokens per sequence (EMA)

    def propose(self, req: Request, k: int) -> list[int]:
        return self.propose_batch([req], [k])[0]

    def propose_batch(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in reqs]
        work: list[tuple[int, Request, int]] = []  # (index in reqs, shadow, proposals)
        for i, (req, k) in enumerate(zip(reqs, ks)):
            k = min(k, self.max_model_len - req.num_tokens + 1)  # last position L + k - 2
            if k <= 0:
                continue
            sh = self.shadows.sync(req)
            if self.shadows.kv.allocate(sh, sh.num_tokens - sh.num_computed_tokens):
                work.append((i, sh, k))
        self._catch_up([sh for _, sh, _ in work])
        for j in range(1, max((k for *_, k in work), default=0)):
            step = [sh for _, sh, k in work if k > j  # those whose last guess came in
                    and sh.num_tokens == sh.num_computed_tokens + 1
                    and self.shadows.kv.allocate(sh, 1)]
            if not step:
                break
            self._forward([ScheduledRequest(sh, 1, sh.num_computed_tokens) for sh in step])
        for i, sh, k in work:
            done = sh.num_tokens - reqs[i].num_tokens  # tokens guessed after req's
            guess = sh.output_token_ids[len(sh.output_token_ids) - done:]
            out[i] = _below(guess[:k], self.target_vocab)
        return out

    def _catch_up(self, shadows: list[Request]) -> None:
        """Compute every shadow's uncomputed tokens, at most `max_batched_tokens` per
        forward; the forward that reaches a shadow's end appends its first guess."""
        goal = {sh.request_id: sh.num_tokens for sh in shadows}
        todo = [sh for sh in shadows if sh.num_tokens > sh.num_computed_tokens]
        while todo:
            budget, batch = self.max_batched_tokens, []
            for sh in todo:
                n = min(sh.num_tokens - sh.num_computed_tokens, budget)
                if n <= 0:
                    break
                batch.append(ScheduledRequest(sh, n, sh.num_computed_tokens))
                budget -= n
            self._forward(batch)
            todo = [sh for sh in todo if sh.num_computed_tokens < goal[sh.request_id]]

    def _forward(self, batch: list[ScheduledRequest]) -> None:
        """One draft forward: advance each shadow's computed tokens, append its guess."""
        t0 = time.perf_counter()
        result = self.runner.execute(SchedulerOutput(batch))
        self.num_forwards += 1
        if all(s.num_new_tokens <= SHORT_FORWARD for s in batch):  # not a prompt's prefill
            self.seconds_per_position = _ema(self.seconds_per_position,
                                             time.perf_counter() - t0)
        for s in batch:
            s.request.num_computed_tokens = s.start + s.num_new_tokens
            if s.samples:
                s.request.output_token_ids.append(result.sampled[s.request.request_id][0])

    def observe_step(self, sched: SchedulerOutput, result) -> None:
        """Nothing to learn from the target's step: the next sync rolls back."""

    def release(self, request_id: str) -> None:
        self.shadows.release(request_id)


def _ema(old: float, new: float) -> float:
    return new if old == 0 else old + COST_DECAY * (new - old)


def _below(tokens: list[int], vocab: int) -> list[int]:
    """The proposals up to the first id the target's vocabulary does not have (a draft
    whose embedding is padded further)."""
    for j, t in enumerate(tokens):
        if t >= vocab:
            return tokens[:j]
    return tokens


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, target_path: str,
                          draft_path: str) -> None:
    """Raise ValueError unless the two tokenizers agree (size, special ids, a sample)."""
    def differ(what: str, a, b) -> ValueError:
        return ValueError(f"the draft model {draft_path} does not share the target's "
                          f"tokenizer ({what}: target {a!r}, draft {b!r}); speculative "
                          "decoding with a draft needs the same vocabulary")
    if target.vocab_size != draft.vocab_size:
        raise differ("vocabulary size", target.vocab_size, draft.vocab_size)
    if target.eos_token_id != draft.eos_token_id:
        raise differ("EOS id", target.eos_token_id, draft.eos_token_id)
    a, b = target.encode(SAMPLE_TEXT, False), draft.encode(SAMPLE_TEXT, False)
    if a != b:
        raise differ("ids of a sample text", a[:12], b[:12])
    n = target.vocab_size
    for i in sorted({0, 1, n // 3, n // 2, n - 1}):
        if target.id_to_token(i) != draft.id_to_token(i):
            raise differ(f"token {i}", target.id_to_token(i), draft.id_to_token(i))


def build_draft_proposer(config: EngineConfig, target_config: ModelConfig,
                         target_tokenizer: Tokenizer, target_capacity: int,
                         max_batched_tokens: int) -> DraftModelProposer:
    """Load the draft of `config.speculative_model` beside the target: the same runner
    settings, a KV cache of `target_capacity` tokens plus room for proposals."""
    path = resolve_model(config.speculative_model)
    draft_config = ModelConfig.load(path)
    check_same_vocabulary(target_tokenizer, Tokenizer.load(path), target_config.path, path)
    if draft_config.vocab_size < target_tokenizer.vocab_size:
        raise ValueError(f"the draft model {path} has {draft_config.vocab_size} embedding "
                         f"rows, fewer than the tokenizer's {target_tokenizer.vocab_size}")
    runner = ModelRunner(draft_config, replace(config, model=path), role="draft")
    if runner.is_encoder:
        raise ValueError(f"the draft model {path} is an encoder; it cannot propose tokens")
    if runner.sliding_layers:  # its shadows keep one block table (spec/shadow.py)
        raise ValueError(f"the draft model {path} mixes sliding-window and full-attention "
                         "layers (two KV-cache groups), which a draft does not support; "
                         "use a draft whose layers all attend alike")
    room = config.max_num_seqs * (config.num_speculative_tokens + config.block_size)
    tokens = target_capacity + room
    num_blocks = runner.allocate_kv_cache(runner.kv_bytes_per_token() * tokens +
                                          runner.kv_bytes_per_token() * config.block_size)
    return DraftModelProposer(runner, num_blocks, draft_config.max_context_len,
                              max_batched_tokens, target_config.vocab_size)
