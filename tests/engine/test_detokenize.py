"""Incremental detokenization with the real Qwen2 tokenizer."""

from __future__ import annotations

import pytest

from yun.engine.detokenize import IncrementalDetokenizer
from yun.sampling_params import SamplingParams
from yun.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(qwen2_path) -> Tokenizer:
    return Tokenizer.from_folder(qwen2_path)


def run(tok, text: str, **params) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(**params))
    shown, stop = [], None
    for t in ids:
        stop = d.update([t])
        shown.append(d.output_text(finished=False))
        if stop:
            break
    return d, shown, stop


def test_multibyte_characters_are_never_emitted_broken(tok):
    text = "héllo 世界 🙂🙂 naïve ✓"
    d, shown, _ = run(tok, text)
    assert d.text == text
    for s in shown:
        assert "\ufffd" not in s and text.startswith(s)


def test_stop_string_across_tokens_is_cut_and_held_back(tok):
    text = "The answer is forty-two. END of story"
    d, shown, stop = run(tok, text, stop=["END of"])
    assert stop == "END of"
    assert d.text == "The answer is forty-two. "
    # While running, nothing past a possible stop-string start was shown.
    assert all(not s.endswith("EN") for s in shown)
    assert all(text.startswith(s) for s in shown)


def test_include_stop_string(tok):
    d, _, stop = run(tok, "a b c STOP d", stop=["STOP"], include_stop_str_in_output=True)
    assert stop == "STOP" and d.text == "a b c STOP"
