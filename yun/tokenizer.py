"""Tokenizer loading, chat templates and special tokens.

We use the checkpoint's own `tokenizer.json` through transformers' fast tokenizer, and
render the checkpoint's own chat template (jinja2, via transformers), so prompts are
exactly what the model was trained on.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase):
        self.hf = hf
        backend = getattr(hf, "backend_tokenizer", None)
        self._fast = backend  # tokenizers.Tokenizer: decode without Python overhead

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """From an HF folder or a GGUF file."""
        return cls.from_gguf(path) if os.path.isfile(path) else cls.from_folder(path)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """The tokenizer in a GGUF file's metadata (`tokenizer.ggml.*`, chat template),
        built by transformers' GGUF converters. Building it takes seconds for a large
        vocabulary, so the result is kept (as tokenizer.json) in yun's cache, keyed by the
        file's path, size and modification time."""
        cached = _gguf_tokenizer_cache(path)
        if os.path.isfile(os.path.join(cached, "tokenizer.json")):
            try:
                return cls(AutoTokenizer.from_pretrained(cached))
            except Exception:  # a damaged cache entry: rebuild it
                pass
        try:
            hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                               gguf_file=os.path.basename(path))
        except Exception as first:  # e.g. an architecture transformers does not model
            try:
                hf = _tokenizer_from_gguf_fields(path)
            except Exception as e:
                raise ValueError(f"{path}: cannot build the tokenizer from the GGUF "
                                 f"metadata ({first}; {e})") from e
        tmp = f"{cached}.tmp-{os.getpid()}"
        try:
            hf.save_pretrained(tmp)
            _generic_class(tmp)
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache only costs time
        return cls(hf)

    @classmethod
    def from_folder(cls, path: str) -> "Tokenizer":
        if not any(os.path.isfile(os.path.join(path, f))
                   for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise FileNotFoundError(
                f"{path}: no tokenizer found (expected tokenizer.json and tokenizer_config.json)")
        try:
            return cls(AutoTokenizer.from_pretrained(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot load the tokenizer ({e})") from e

    # ---- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The token's text as the user sees it (bytes decoded, partial UTF-8 as escapes)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (byte-level BPE aware)."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    # ---- chat --------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; "
                             "use a completion prompt instead")
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           **kwargs)

    # ---- special tokens ----------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def eos_token(self) -> str | None:
        return self.hf.eos_token

    @property
    def bos_token(self) -> str | None:
        return self.hf.bos_token

    @property
    def pad_token(self) -> str | None:
        return self.hf.pad_token


def _tokenizer_from_gguf_fields(path: str) -> PreTrainedTokenizerBase:
    """transformers' GGUF tokenizer converters, without its model config (which rejects
    architectures it has no model for, such as deepseek2)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, fields, config = get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(arch, fields)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _generic_class(folder: str) -> None:
    """Reload the cached tokenizer.json as it is: a model-specific class (Qwen2Tokenizer)
    would rebuild its pipeline on load (transformers 5 adds an NFC normalizer), and the
    cached tokenizer would then encode differently from the first load."""
    import json

    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def _gguf_tokenizer_cache(path: str) -> str:
    import hashlib

    from yun.model_source import cache_dir

    st = os.stat(path)
    key = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    folder = os.path.join(cache_dir(), "gguf-tokenizers")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, hashlib.sha256(key).hexdigest()[:16])


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
              + list(range(ord("®"), ord("ÿ") + 1)))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER
