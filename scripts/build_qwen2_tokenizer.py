#!/usr/bin/env python3
"""Build the Qwen2 / Qwen2.5 ``tokenizer.json`` from a tiktoken rank file.

Qwen's vocabulary is distributed as ``qwen.tiktoken``: one line per ordinary
token, ``<base64 bytes> <rank>``.  The rank is both the token id and the merge
priority, tiktoken-style: when encoding, the adjacent pair whose concatenation
has the lowest rank is merged first.  A Hugging Face byte-level BPE model
instead needs an explicit, ordered list of merges ``(left, right)``.

Merge recovery
--------------
Tokens are processed in rank order.  For a token ``t`` of rank ``r`` with at
least two bytes, we run tiktoken's byte-pair merge on the bytes of ``t`` while
only allowing merges whose result has a rank strictly below ``r`` (i.e. the
vocabulary as it stood just before ``t`` was learned).  Because ``t`` itself
was produced by exactly one merge, this stops with exactly two parts
``(left, right)``; that pair is merge number ``r`` (merges are emitted in rank
order, so a pair's position in the list is its priority).  Anything other than
two parts means the rank file is not a consistent BPE vocabulary, and we fail.

Each token is merged with a small heap over adjacent pairs plus a
doubly-linked list of parts, so the whole vocabulary (~151k tokens) takes a
few seconds.

The rest of the tokenizer mirrors Qwen2.5-Instruct's ``tokenizer.json``: NFC
normalizer, the Qwen2 split regex followed by a regex-less ByteLevel
pre-tokenizer, ByteLevel post-processor and decoder, and the 22 added tokens
from id 151643 onward.

Usage::

    python scripts/build_qwen2_tokenizer.py [--tiktoken PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import heapq
import importlib.util
import json
import sys
import time
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "yun" / "assets" / "qwen2_tokenizer.json.gz"

NUM_ORDINARY_TOKENS = 151_643

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens of Qwen2.5-Instruct, in id order starting at NUM_ORDINARY_TOKENS.
# (content, special)
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: a printable character for every byte.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map, in
    increasing order, to code points 256, 257, ...
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def find_dashscope_tiktoken() -> Path:
    """Locate ``qwen.tiktoken`` inside the installed dashscope package (without importing it)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dashscope is not installed; pass --tiktoken PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a ``<base64> <rank>`` file and check the ranks are exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            token_b64, rank = line.split()
            token = base64.b64decode(token_b64)
            if token in ranks:
                raise ValueError(f"duplicate token {token!r} in {path}")
            ranks[token] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"ranks in {path} are not a permutation of 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"single-byte tokens missing from {path}: {missing}")
    return ranks


def bpe_limited(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair merge ``token`` using only merges whose result has rank < ``max_rank``.

    Parts are kept in a doubly-linked list indexed by their start offset; a
    min-heap holds candidate pairs ``(rank, start)``, lazily invalidated when
    either side has changed since the candidate was pushed.
    """
    n = len(token)
    end = list(range(1, n + 1))  # end[i]: end offset of the part starting at i
    prev = list(range(-1, n - 1))  # prev[i]: start of the part before i (-1: none)
    alive = [True] * n

    heap: list[tuple[int, int, int, int]] = []  # (rank, start, mid, stop)

    def push(start: int) -> None:
        """Queue the pair formed by the part at ``start`` and its right neighbour, if mergeable."""
        mid = end[start]
        if mid >= n:
            return
        rank = ranks.get(token[start : end[mid]])
        if rank is not None and rank < max_rank:
            heapq.heappush(heap, (rank, start, mid, end[mid]))

    for i in range(n - 1):
        push(i)

    while heap:
        _, start, mid, stop = heapq.heappop(heap)
        # Stale if either part has been merged into something else since.
        if not alive[start] or not alive[mid] or end[start] != mid or end[mid] != stop:
            continue
        end[start] = stop
        alive[mid] = False
        if stop < n:
            prev[stop] = start
        if prev[start] >= 0:
            push(prev[start])
        push(start)

    parts: list[bytes] = []
    i = 0
    while i < n:
        parts.append(token[i : end[i]])
        i = end[i]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the ordered BPE merge list implied by tiktoken ranks (see module docstring)."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = bpe_limited(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) reduces to {len(parts)} parts, expected 2")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """Assemble the Qwen2.5 tokenizer from tiktoken ranks."""
    if len(ranks) != NUM_ORDINARY_TOKENS:
        raise ValueError(f"expected {NUM_ORDINARY_TOKENS} ordinary tokens, got {len(ranks)}")
    alphabet = byte_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    merges = [(to_unicode(left), to_unicode(right)) for left, right in recover_merges(ranks)]

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()

    for offset, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
        token_id = tokenizer.token_to_id(content)
        if token_id != NUM_ORDINARY_TOKENS + offset:
            raise AssertionError(f"{content} got id {token_id}, expected {NUM_ORDINARY_TOKENS + offset}")

    # decoders.ByteLevel() ignores keyword arguments and always serializes its
    # flags as true, whereas Qwen2's tokenizer.json has them false.  They do not
    # affect decoding, but keep the file faithful by patching the config.
    config = json.loads(tokenizer.to_str())
    config["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return Tokenizer.from_str(json.dumps(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiktoken", type=Path, default=None, help="qwen.tiktoken (default: dashscope's copy)")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"gzipped tokenizer.json (default: {DEFAULT_OUTPUT})"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    source = args.tiktoken or find_dashscope_tiktoken()
    ranks = load_tiktoken_ranks(source)
    tokenizer = build_tokenizer(ranks)
    data = tokenizer.to_str(pretty=False).encode("utf-8")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    elapsed = time.perf_counter() - start
    print(
        f"{source} -> {args.output}: {len(ranks)} tokens, {tokenizer.get_vocab_size()} with added, "
        f"{len(data)} bytes json, {args.output.stat().st_size} bytes gz, {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
