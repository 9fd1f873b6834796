"""Seeded standard workloads: lists of token-id prompts with exact output lengths.

Prompts are random ids from the ordinary vocabulary (below the special tokens), so every
server that takes token ids gets exactly the same work, and no tokenizer is involved.
The same (name, options) always gives the same requests.

    single          1 request: prompt 128, 256 new tokens (batch-1 decode speed)
    mixed           64 requests: prompts uniform in [32, 512], outputs uniform in [32, 256]
    shared-prefix   64 requests: one 1,024-token system prompt (or --num-prefixes distinct
                    ones, assigned round-robin) + a 64-token unique question; 64 new tokens
    sweep           mixed-like requests run at concurrency 1, 2, 4, ..., 64
    edit            1 request (batch 1): a chat asking for a document of a few hundred
                    tokens back with one word replaced; 256 new tokens. Real text in the
                    model's chat template, so it needs the model's tokenizer (the output
                    copies the input: the case for n-gram speculative decoding)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from yun.engine.inputs import render_chat

WORKLOADS = ("single", "mixed", "shared-prefix", "sweep", "edit")
ORDINARY_VOCAB = 151643  # Qwen2: ids below this are ordinary tokens, above are special
DEFAULT_SWEEP = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int  # exact: the benchmark asks for ignore_eos

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class WorkloadOptions:
    """Knobs that shrink or reshape a workload (tests and smoke runs use them)."""

    num_requests: int | None = None  # default: the workload's own count (per level in sweep)
    scale: float = 1.0  # multiplies every prompt and output length (at least 1 token each)
    seed: int = 0
    num_prefixes: int = 1  # shared-prefix: distinct system prompts
    concurrency_levels: tuple[int, ...] = DEFAULT_SWEEP  # sweep only
    vocab_size: int = ORDINARY_VOCAB  # ids are drawn from [0, min(vocab_size, 151643))

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.num_prefixes < 1:
            raise ValueError(f"num_prefixes must be at least 1, got {self.num_prefixes}")
        if not self.concurrency_levels or min(self.concurrency_levels) < 1:
            raise ValueError("concurrency_levels must be positive integers, got "
                             f"{self.concurrency_levels}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: list[BenchRequest]
    # sweep: one list of requests per concurrency level (run closed-loop at that level)
    levels: dict[int, list[BenchRequest]] = field(default_factory=dict)

    @property
    def is_sweep(self) -> bool:
        return bool(self.levels)

    def phases(self) -> list[tuple[int | None, list[BenchRequest]]]:
        """(concurrency, requests) to run one after the other; None = all at once."""
        if self.is_sweep:
            return sorted(self.levels.items())
        return [(None, self.requests)]

    def max_seq_len(self) -> int:
        reqs = [r for _, rs in self.phases() for r in rs]
        return max(r.num_prompt_tokens + r.max_tokens for r in reqs)

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description,
                **totals(self.requests),
                "levels": {str(c): totals(rs) for c, rs in sorted(self.levels.items())}}


def totals(requests: list[BenchRequest]) -> dict[str, int]:
    return {"num_requests": len(requests),
            "prompt_tokens": sum(r.num_prompt_tokens for r in requests),
            "output_tokens": sum(r.max_tokens for r in requests),
            "unique_prompt_tokens": unique_prompt_tokens(requests)}


def unique_prompt_tokens(requests: list[BenchRequest]) -> int:
    """Prompt tokens left to compute when every shared prefix is computed once: the
    node count of the prompts' trie (sorted prompts minus each one's common prefix
    with its predecessor)."""
    prompts = sorted(r.prompt_token_ids for r in requests)
    total, prev = 0, []
    for p in prompts:
        common = 0
        for a, b in zip(p, prev):
            if a != b:
                break
            common += 1
        total += len(p) - common
        prev = p
    return total


# ---- generators ---------------------------------------------------------------------------
def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


class _Draw:
    """All randomness of one workload, from one seeded generator."""

    def __init__(self, seed: int, vocab_size: int):
        self.rng = random.Random(seed)
        self.high = min(vocab_size, ORDINARY_VOCAB)

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.high) for _ in range(n)]

    def length(self, low: int, high: int, scale: float) -> int:
        return _scaled(self.rng.randint(low, high), scale)


def _single(o: WorkloadOptions, d: _Draw) -> Workload:
    n = o.num_requests or 1
    p, out = _scaled(128, o.scale), _scaled(256, o.scale)
    reqs = [BenchRequest(d.ids(p), out) for _ in range(n)]
    return Workload("single", f"{n} request(s): prompt {p}, {out} new tokens", reqs)


def _mixed_requests(n: int, o: WorkloadOptions, d: _Draw) -> list[BenchRequest]:
    reqs = []
    for _ in range(n):
        p = d.length(32, 512, o.scale)
        reqs.append(BenchRequest(d.ids(p), d.length(32, 256, o.scale)))
    return reqs


def _mixed(o: WorkloadOptions, d: _Draw) -> Workload:
    n = o.num_requests or 64
    lo, hi = _scaled(32, o.scale), _scaled(512, o.scale)
    olo, ohi = _scaled(32, o.scale), _scaled(256, o.scale)
    return Workload("mixed", f"{n} requests: prompts uniform in [{lo}, {hi}], outputs "
                    f"uniform in [{olo}, {ohi}], all submitted at once",
                    _mixed_requests(n, o, d))


def _shared_prefix(o: WorkloadOptions, d: _Draw) -> Workload:
    n = o.num_requests or 64
    plen, qlen, out = _scaled(1024, o.scale), _scaled(64, o.scale), _scaled(64, o.scale)
    prefixes = [d.ids(plen) for _ in range(o.num_prefixes)]
    reqs = [BenchRequest(prefixes[i % o.num_prefixes] + d.ids(qlen), out) for i in range(n)]
    return Workload("shared-prefix", f"{n} requests: {o.num_prefixes} shared {plen}-token "
                    f"prefix(es) + a {qlen}-token unique question, {out} new tokens", reqs)


def _sweep(o: WorkloadOptions, d: _Draw) -> Workload:
    levels: dict[int, list[BenchRequest]] = {}
    for c in sorted(set(o.concurrency_levels)):
        n = o.num_requests or max(4, 2 * c)
        levels[c] = _mixed_requests(n, o, d)
    per = f"{o.num_requests} requests" if o.num_requests else "max(4, 2 x concurrency) requests"
    return Workload("sweep", f"mixed-like requests at concurrency {sorted(levels)}; {per} per "
                    "level, run closed-loop (a new request as soon as one finishes)",
                    [r for rs in levels.values() for r in rs], levels)


# The edit workload's document: sentences drawn (seeded) from this pool, in order.
_EDIT_SENTENCES = (
    "The engine keeps one queue of requests and runs them in steps.",
    "Each step, the scheduler picks the requests that compute tokens and how many.",
    "A long prompt is split into chunks, so that short requests keep flowing.",
    "The key and value vectors of every token are stored in blocks of sixteen.",
    "When the cache is full, the newest request is paused and its blocks are freed.",
    "It is computed again later, from its prompt and the tokens it already has.",
    "Blocks are named by the tokens they hold, so a shared prefix is computed once.",
    "The model runner turns the batch into flat tensors and runs the model once.",
    "Logits become tokens in the sampler, with penalties, filters and a seed per request.",
    "Stop strings are matched on the text, across token boundaries.",
    "The server streams each new piece of text as soon as it is decoded.",
    "Every request may ask for the log probabilities of its tokens.",
    "A grammar can constrain the output to valid JSON of a given schema.",
    "Quantized weights stay quantized in memory and are read by native kernels.",
    "On a CPU, decoding one token reads every weight of the model once.",
    "The benchmark reports time to first token, time per token and throughput.",
    "Tests drive the scheduler with hand-made outputs, without any model.",
    "The configuration is a frozen dataclass, and the flags come from its fields.",
    "A request that is cancelled frees its blocks at once.",
    "The same seed gives the same tokens, whatever else shares the batch.",
)
_EDIT_SWAPS = (("request", "job"), ("tokens", "pieces"), ("blocks", "pages"),
               ("model", "network"), ("step", "round"))


def _edit(o: WorkloadOptions, d: _Draw, tokenizer: Any) -> Workload:
    if tokenizer is None:
        raise ValueError("the edit workload is real text: it needs the model's tokenizer")
    n = o.num_requests or 1
    out = _scaled(256, o.scale)
    reqs = []
    for _ in range(n):
        order = sorted(d.rng.sample(range(len(_EDIT_SENTENCES)), 14))
        doc = " ".join(_EDIT_SENTENCES[i] for i in order)
        old, new = _EDIT_SWAPS[d.rng.randrange(len(_EDIT_SWAPS))]
        ask = (f"Rewrite the following text, word for word, but replace the word '{old}' "
               f"with '{new}' everywhere. Output only the rewritten text.\n\n{doc}")
        _, ids = render_chat(tokenizer, [{"role": "user", "content": ask}])  # as served
        reqs.append(BenchRequest(ids, out))
    p = sum(r.num_prompt_tokens for r in reqs) // n
    return Workload("edit", f"{n} request(s): rewrite a document with one word replaced "
                    f"(chat prompt of ~{p} tokens), {out} new tokens", reqs)


_BUILDERS = {"single": _single, "mixed": _mixed, "shared-prefix": _shared_prefix,
             "sweep": _sweep}


def make_workload(name: str, options: WorkloadOptions = WorkloadOptions(),
                  tokenizer: Any = None) -> Workload:
    """The named workload; deterministic for a given (name, options) (and tokenizer, for
    the text workloads)."""
    if name == "edit":
        return _edit(options, _Draw(options.seed, options.vocab_size), tokenizer)
    if name not in _BUILDERS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return _BUILDERS[name](options, _Draw(options.seed, options.vocab_size))
