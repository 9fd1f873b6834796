"""Engine logprobs ({token_id: Logprob} per position) in the two OpenAI shapes.

Completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`,
one entry per token (a prompt's first token has no logprob: null). Chat:
`{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from yun.outputs import Logprob, PositionLogprobs


class TokenText(Protocol):
    def id_to_token(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def _text(tok: TokenText, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tok.id_to_token(token_id)


def _ranked(entry: PositionLogprobs, n: int) -> list[tuple[int, Logprob]]:
    """The n most likely candidates of one position, best first."""
    return sorted(entry.items(), key=lambda kv: (-kv[1].logprob, kv[1].rank))[:n]


@dataclass
class CompletionLogprobs:
    """Completions logprobs, built incrementally (a stream sends only the new part)."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def completion_logprobs(tok: TokenText, token_ids: list[int],
                        entries: list[PositionLogprobs | None], num_top: int,
                        start_offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """Logprobs of `token_ids` (entry None: no logprob, e.g. a prompt's first token).

    Each top_logprobs dict holds the top `num_top` candidates and the actual token, as
    lm-evaluation-harness expects (it checks `token_logprob == max(top.values())` for
    greedy). Returns the logprobs and the text offset after the last token.
    """
    out = CompletionLogprobs()
    offset = start_offset
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry is not None else None
        text = _text(tok, token_id, chosen)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if chosen is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(chosen.logprob)
        top = {_text(tok, t, lp): lp.logprob for t, lp in _ranked(entry, num_top)}
        top.setdefault(text, chosen.logprob)
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(tok: TokenText, token_ids: list[int], entries: list[PositionLogprobs],
                  num_top: int) -> list[dict[str, Any]]:
    """The `content` list of a chat choice's logprobs, one item per generated token."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        if chosen is None:  # the engine always reports the chosen token; be safe anyway
            continue
        content.append({
            "token": _text(tok, token_id, chosen),
            "logprob": chosen.logprob,
            "bytes": list(tok.token_bytes(token_id)),
            "top_logprobs": [{"token": _text(tok, t, lp), "logprob": lp.logprob,
                              "bytes": list(tok.token_bytes(t))}
                             for t, lp in _ranked(entry, num_top)],
        })
    return content
