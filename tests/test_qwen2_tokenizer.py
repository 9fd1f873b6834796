"""The packaged Qwen2 tokenizer against llama.cpp's qwen2 tokenizer test vectors.

``tests/data/ggml-vocab-qwen2.gguf.inp`` holds test strings separated by
``\\n__ggml_vocab_test__\\n``; ``.out`` holds the expected token ids (produced by
Hugging Face's Qwen2 tokenizer with ``add_special_tokens=False``), one line of
space-separated ids per test.  Both files come from llama.cpp (MIT licence).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from tokenizers import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSET = REPO_ROOT / "yun" / "assets" / "qwen2_tokenizer.json.gz"
DATA = Path(__file__).resolve().parent / "data"
SEPARATOR = "\n__ggml_vocab_test__\n"

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
FIRST_NON_SPECIAL = "<tool_call>"  # from here on Qwen2.5 marks added tokens special=False


def load_vectors() -> list[tuple[str, list[int]]]:
    """Split the .inp/.out pair the way llama.cpp's test-tokenizer-0 does."""
    raw = (DATA / "ggml-vocab-qwen2.gguf.inp").read_bytes().decode("utf-8")
    texts: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt == -1:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    lines = (DATA / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # trailing newline of the file, not an empty test
    assert len(texts) == len(lines), (len(texts), len(lines))
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(texts, lines)]


VECTORS = load_vectors()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_str(gzip.decompress(ASSET.read_bytes()).decode("utf-8"))


def test_vector_count() -> None:
    assert len(VECTORS) == 46


@pytest.mark.parametrize(("text", "expected"), VECTORS, ids=[f"{i:02d}" for i in range(len(VECTORS))])
def test_encode_matches_llama_cpp(tokenizer: Tokenizer, text: str, expected: list[int]) -> None:
    assert tokenizer.encode(text, add_special_tokens=False).ids == expected


@pytest.mark.parametrize(("text", "expected"), VECTORS, ids=[f"{i:02d}" for i in range(len(VECTORS))])
def test_decode_round_trips(tokenizer: Tokenizer, text: str, expected: list[int]) -> None:
    assert tokenizer.decode(expected, skip_special_tokens=False) == text


def test_vocab_size(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size(with_added_tokens=False) == 151643
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 151665


def test_special_tokens(tokenizer: Tokenizer) -> None:
    added = tokenizer.get_added_tokens_decoder()
    special_from = SPECIAL_TOKENS[FIRST_NON_SPECIAL]
    for content, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.token_to_id(content) == token_id
        assert tokenizer.id_to_token(token_id) == content
        assert added[token_id].content == content
        assert added[token_id].special == (token_id < special_from)
        assert tokenizer.encode(content, add_special_tokens=False).ids == [token_id]


def test_chat_markup(tokenizer: Tokenizer) -> None:
    text = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHello\nassistant\n"


def test_nfc_normalization(tokenizer: Tokenizer) -> None:
    decomposed = "A\u0308pfel"  # "Äpfel" with a combining diaeresis
    assert tokenizer.encode(decomposed, add_special_tokens=False).ids == VECTORS[1][1]
