"""Tokenizer.from_gguf against transformers' GGUF tokenizer on the same file: the real
SmolLM2 file (pre-tokenizer `smollm`) and a converter-made file with the real Qwen2
tokenizer (pre-tokenizer `qwen2`, 151k tokens). Encodings, decodings, the chat template,
and BOS/EOS ids as the metadata gives them. Both the first load (yun builds the tokenizer
and caches it) and the second (from yun's cache) are checked."""

from __future__ import annotations

import os

import pytest

from tests.gguf.reference import read_gguf

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's DON'T-care.",
    # multilingual
    "你好，世界！今天天气很好。", "日本語のテキストとカタカナ、ひらがな。", "한국어 문장입니다.",
    "Привет, как дела? Ёлка.", "مرحبا بالعالم", "नमस्ते दुनिया", "Ελληνικά κείμενα",
    "Ça va? Über naïve façade — jalapeño, Smørrebrød, İstanbul",
    "e\u0301 combining accent, \u00e9 precomposed, ﬁ ligature, ½ ①",
    # emoji: plain, skin tone, ZWJ sequence, flags, keycap
    "I ❤️ emoji 😀🙏🏽 👩‍👩‍👧‍👦 🇫🇷🇯🇵 1️⃣ ✨",
    # whitespace runs
    "a  b   c    d", "   leading", "trailing   ", "tabs\t\tand\tmore\t", "\n\nnew\n\n\nlines\n",
    "mixed \t \n \r\n  \u00a0 nbsp\u3000ideographic",
    # code
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n// done",
    '{"key": [1, 2.5e-3, null], "k2": "v\\n"}',
    # numbers
    "1234567890 3.14159 1,000,000 2024-01-01 0x1F",
    # special tokens written in the text
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|endoftext|>",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "日本語で答えて。\n\n  Indented?"}],
]


@pytest.fixture(scope="module", params=["smollm2", "qwen2"])
def gguf_file(request, gguf_models, smollm2) -> str:
    if request.param == "smollm2":
        return smollm2
    return gguf_models.gguf("qwen2", "F32")


@pytest.fixture(scope="module")
def pair(gguf_file, tmp_path_factory):
    """(yun's tokenizer built from the file, yun's from its cache, transformers'), with
    yun's cache in a fresh folder so the first load builds."""
    import transformers

    from yun.tokenizer import Tokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("YUN_CACHE", str(tmp_path_factory.mktemp("yun-cache")))
    try:
        built = Tokenizer.from_gguf(gguf_file)
        cached = Tokenizer.from_gguf(gguf_file)
    finally:
        mp.undo()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                                     gguf_file=os.path.basename(gguf_file))
    return built, cached, ref


@pytest.mark.parametrize("add_special", [True, False])
def test_encodings_equal_transformers_gguf_tokenizer(pair, add_special):
    built, cached, ref = pair
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=add_special)
        assert built.encode(text, add_special_tokens=add_special) == want, repr(text)
        assert cached.encode(text, add_special_tokens=add_special) == want, \
            f"from yun's cache: {text!r}"


def test_decodings_equal_transformers(pair):
    built, cached, ref = pair
    for text in TEXTS:
        ids = ref.encode(text, add_special_tokens=False)
        for skip in (False, True):
            want = ref.decode(ids, skip_special_tokens=skip)
            assert built.decode(ids, skip_special_tokens=skip) == want, repr(text)
            assert cached.decode(ids, skip_special_tokens=skip) == want, repr(text)
        assert built.decode(ids, skip_special_tokens=False) == text  # byte-level: lossless


def test_special_tokens_in_text_are_single_ids(pair):
    built, _, ref = pair
    ids = built.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == ref.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == ref.convert_tokens_to_ids("<|im_end|>")


def test_chat_template_renders_as_transformers_renders_it(pair, gguf_file):
    built, cached, ref = pair
    template = read_gguf(gguf_file).metadata["tokenizer.chat_template"]
    assert built.chat_template == template
    for messages in CHATS:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert built.apply_chat_template(messages, add_generation_prompt=gen) == want
            assert cached.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_bos_eos_ids_come_from_the_metadata(pair, gguf_file):
    built, cached, _ = pair
    meta = read_gguf(gguf_file).metadata
    eos = meta["tokenizer.ggml.eos_token_id"]
    tokens = meta["tokenizer.ggml.tokens"]
    for tok in (built, cached):
        assert tok.eos_token_id == eos
        assert tok.eos_token == tokens[eos]
        if "tokenizer.ggml.bos_token_id" in meta:
            assert tok.bos_token == tokens[meta["tokenizer.ggml.bos_token_id"]]
        assert tok.vocab_size == len(tokens)
    if meta.get("tokenizer.ggml.add_bos_token"):
        assert built.encode("x")[0] == meta["tokenizer.ggml.bos_token_id"]
    else:
        assert built.encode("x") == built.encode("x", add_special_tokens=False)


def test_known_ids(gguf_file):
    """Pinned values, so a change on both sides (a transformers upgrade) still shows."""
    from yun.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf_file)
    meta = read_gguf(gguf_file).metadata
    if meta["tokenizer.ggml.pre"] == "smollm":
        assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
        assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    else:
        assert meta["tokenizer.ggml.pre"] == "qwen2"
        assert meta["tokenizer.ggml.eos_token_id"] == 151645  # <|im_end|>
        assert tok.encode("<|im_start|><|im_end|><|endoftext|>", add_special_tokens=False) \
            == [151644, 151645, 151643]
    # digits: both pre-tokenizers split numbers into single digits
    pieces = [tok.decode([i], skip_special_tokens=False) for i in
              tok.encode("12345", add_special_tokens=False)]
    assert pieces == list("12345")
