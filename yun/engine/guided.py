"""Constrained decoding with xgrammar: JSON schemas, regexes, choices and EBNF grammars.

One `GuidedDecoder` per engine (per tokenizer) owns the xgrammar `GrammarCompiler`, built
on first use from the tokenizer's vocabulary, and an LRU cache of compiled grammars keyed
by spec. Each guided request gets a `GrammarState` (one xgrammar `GrammarMatcher`) when it
is added; the sampler fills and applies the token bitmasks of the rows that have one, and
the scheduler advances the state with each committed token (`accept`). States only move
on committed tokens, so a preempted request that recomputes its KV keeps its state.

xgrammar is imported on first use: requests without a grammar never load it. Its masks
cost a few microseconds per token for most grammars; length-bounded strings ("maxLength")
cannot be precomputed and cost milliseconds per token while inside such a string.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from yun.sampling_params import GuidedDecoding

log = logging.getLogger("yun.engine")

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (a JSON schema's is ~0.1-1 MB)
COMPILE_THREADS = 2

_XGR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _clean(message: str) -> str:
    """xgrammar's error text without its log prefix ('[12:00:00] file.cc:12: ')."""
    return _XGR_LOG_PREFIX.sub("", str(message).strip()).strip()


# xgrammar (0.2.8) lets length-bounded JSON strings ("maxLength") hold raw control
# characters, which JSON forbids; we compile its EBNF with the class it uses elsewhere.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _json_grammar(schema: str, strict: bool) -> str:
    """EBNF for a JSON schema: compact JSON (no free whitespace, so a model cannot pad
    forever), no properties beyond the schema's when `strict`."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    return str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _choice_ebnf(choices: Sequence[str]) -> str:
    # JSON string literals are valid EBNF literals (same escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarState:
    """One request's position in its grammar. `start_after` defers the constraint until
    those token ids have been generated (e.g. the end of the model's reasoning)."""

    __slots__ = ("matcher", "start_after", "active", "broken", "_recent")

    def __init__(self, matcher: Any, start_after: tuple[int, ...] = ()):
        self.matcher = matcher
        self.start_after = start_after
        self.active = not start_after
        self.broken = False  # a token the grammar forbids was committed (never expected)
        self._recent: list[int] = []

    @property
    def terminated(self) -> bool:
        """The grammar accepted its stop token (or broke): the request must finish now."""
        return self.broken or (self.active and self.matcher.is_terminated())

    def accept(self, token: int) -> None:
        """Advance by a committed token."""
        if self.active:
            if not self.matcher.accept_token(token):
                log.warning("guided decoding: token %d is outside the grammar; stopping", token)
                self.broken = True
            return
        self._recent = (self._recent + [token])[-len(self.start_after):]
        self.active = tuple(self._recent) == self.start_after


    def masks_along(self, draft: Sequence[int], vocab_size: int) -> torch.Tensor:
        """Bitmasks [len(draft) + 1, ceil(V / 32)] int32: row j is the grammar's mask after
        the tokens draft[:j] (speculative decoding verifies every row at once). The state
        is the same afterwards. Rows past a draft token the grammar refuses, or past its
        end, allow everything: verification never reaches them."""
        import xgrammar as xgr

        masks = xgr.allocate_token_bitmask(len(draft) + 1, vocab_size)  # all allowed
        saved = (self.active, list(self._recent))
        advanced = 0
        try:
            for j in range(len(draft) + 1):
                if self.active:
                    if self.matcher.is_terminated():
                        break
                    self.matcher.fill_next_token_bitmask(masks, j)
                if j == len(draft):
                    break
                if self.active:
                    if not self.matcher.accept_token(draft[j]):
                        break
                    advanced += 1
                else:
                    self._recent = (self._recent + [draft[j]])[-len(self.start_after):]
                    self.active = tuple(self._recent) == self.start_after
        finally:
            if advanced:
                self.matcher.rollback(advanced)
            self.active, self._recent = saved
        return masks


class GuidedDecoder:
    """Compiles grammar specs for one tokenizer (thread-safe: the server compiles in a
    worker thread and hands the result to the engine loop with the request)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size  # the model's (logits width), >= the tokenizer's
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._cache: OrderedDict[GuidedDecoding, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                try:
                    info = xgr.TokenizerInfo.from_huggingface(
                        self.hf_tokenizer, vocab_size=self.vocab_size,
                        stop_token_ids=self.stop_token_ids)
                except Exception as e:  # noqa: BLE001 - a ValueError for the caller
                    raise ValueError("guided decoding is not available for this tokenizer: "
                                     f"{_clean(str(e))}") from e
                # Our LRU below bounds memory; xgrammar's own cache would grow unbounded.
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS,
                                                     cache_enabled=False)
            return self._compiler

    def compile(self, spec: GuidedDecoding) -> Any:
        """The compiled grammar for `spec` (cached). ValueError naming the problem."""
        key = GuidedDecoding(**{**spec.__dict__, "start_after": ()})
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(key)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GuidedDecoding) -> Any:
        compiler = self._get_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_grammar(_json_grammar(spec.json, strict=True))
            if kind == "json_object":
                return compiler.compile_grammar(_json_grammar('{"type": "object"}', strict=False))
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "JSON schema", "json_object": "JSON grammar", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[kind]
            raise ValueError(f"invalid {what}: {_clean(str(e))}") from None

    def new_state(self, compiled: Any, start_after: tuple[int, ...],
                  stop_token_ids: Sequence[int]) -> GrammarState:
        """A fresh matcher for one request over a grammar from `compile` (no second
        lookup); the grammar ends with one of `stop_token_ids`."""
        import xgrammar as xgr

        stops = sorted({t for t in stop_token_ids if 0 <= t < self.vocab_size})
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops or None)
        return GrammarState(matcher, start_after)


@functools.lru_cache(maxsize=1)
def _batch_matcher() -> Any:
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads="auto")


def _apply_on_cpu(logits: torch.Tensor, bitmask: torch.Tensor, idx: list[int]) -> None:
    """Unpack the bits and write -inf with numpy: ~0.2 ms per row whatever the mask, and
    single-threaded, so it never waits on a busy core; xgrammar's CPU kernel takes ~0.8 ms
    when most tokens are forbidden (every structural position of a JSON answer). Bit t of
    a row is token t (little-endian words)."""
    words = ~bitmask.numpy()[idx]  # [G, ceil(V / 32)] int32, bits set = forbidden
    forbidden = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    forbidden = forbidden[:, :logits.shape[1]].view(np.bool_)  # [G, V]
    x = logits.numpy()  # shares memory with logits
    for j, i in enumerate(idx):
        np.copyto(x[i], -np.inf, where=forbidden[j])


class GuidedRow(Protocol):
    """What the masks read of a sampler row (engine.sampler.SamplingRow is one)."""

    grammar: "GrammarState | None"
    params: Any  # SamplingParams: min_tokens
    output_token_ids: list[int]


def apply_grammar_masks(logits: torch.Tensor, rows: Sequence[GuidedRow]) -> None:
    """Mask, in place, the tokens each guided row's grammar forbids. logits: [B, V].

    Rows without a grammar (or whose constraint has not started) are left untouched.
    If a `min_tokens` ban left a row nothing (the grammar can only end), the grammar's
    end wins: its stop tokens are allowed again.
    """
    import xgrammar as xgr

    ahead = [i for i, r in enumerate(rows) if r.grammar_mask is not None]
    fill = [i for i, r in enumerate(rows) if r.grammar is not None and r.grammar.active
            and r.grammar_mask is None]
    idx = sorted(ahead + fill)
    if not idx:
        return
    B, V = logits.shape
    bitmask = xgr.allocate_token_bitmask(B, V)  # [B, ceil(V / 32)] int32, all allowed
    for i in ahead:  # speculative rows: masks filled along the proposals
        bitmask[i] = rows[i].grammar_mask
    if len(fill) == 1:
        rows[fill[0]].grammar.matcher.fill_next_token_bitmask(bitmask, fill[0])
    elif fill:  # xgrammar fills the rows in parallel threads, without the GIL
        _batch_matcher().batch_fill_next_token_bitmask(
            [rows[i].grammar.matcher for i in fill], bitmask, indices=fill)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        _apply_on_cpu(logits, bitmask, idx)
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        indices=idx)
    early = [i for i in idx if len(rows[i].output_token_ids) < rows[i].params.min_tokens]
    if early:
        dead = torch.isneginf(logits[early]).all(-1).tolist()
        for i, d in zip(early, dead):
            if d:
                stops = [t for t in rows[i].grammar.matcher.stop_token_ids if t < V]
                logits[i, stops] = 0.0
