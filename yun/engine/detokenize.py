"""Incremental detokenization and stop strings.

Text is decoded a few tokens at a time against a short window of preceding tokens, so
a character split across byte-level tokens is only emitted once complete (never broken
UTF-8). Stop strings are matched on the text, across token boundaries; while a request
runs, the last `max(len(stop)) - 1` characters are held back, since they may yet turn
out to start a stop string.
"""

from __future__ import annotations

from typing import Protocol

from yun.sampling_params import SamplingParams

WINDOW = 5  # tokens of left context used to decode the next piece


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.ids: list[int] = list(prompt_token_ids[-WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all decoded output text (stop string cut off once matched)
        self.stop_buffer = max((len(s) for s in params.stop), default=1) - 1
        self.stopped = False

    def update(self, new_token_ids: list[int]) -> str | None:
        """Decode new tokens; returns the stop string if one matched (text is cut there)."""
        if not self.params.detokenize or self.stopped:
            return None
        start = len(self.text)
        for tok in new_token_ids:
            self.ids.append(tok)
            self.text += self._next_piece()
        return self._check_stop(start)

    def _next_piece(self) -> str:
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if self.prefix_offset > 4 * WINDOW:  # keep the window short
                drop = self.prefix_offset - WINDOW
                self.ids = self.ids[drop:]
                self.prefix_offset -= drop
                self.read_offset -= drop
            return full[len(prefix):]
        return ""

    def _check_stop(self, new_from: int) -> str | None:
        for stop in self.params.stop:
            idx = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if idx != -1:
                end = idx + len(stop) if self.params.include_stop_str_in_output else idx
                self.text = self.text[:end]
                self.stopped = True
                return stop
        return None

    def output_text(self, finished: bool) -> str:
        """The text safe to show now: all of it once finished, else minus the held-back tail."""
        if finished or self.stopped or self.stop_buffer == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self.stop_buffer)]
