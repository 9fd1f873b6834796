"""One GGUF file, opened once with the `gguf` package (memory-mapped, copy-on-write):
its metadata, its tensors, and the Hugging Face-shaped config derived from them.

Every failure inside `gguf` (bad magic, truncated file, unknown tensor type) becomes a
`CheckpointError` that names the file, and the tensor where there is one.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from yun.models.errors import CheckpointError
from yun.models.gguf_config import MetadataError, hf_config

GGUF_MAGIC = b"GGUF"


def find_gguf(path: str) -> str | None:
    """`path` itself if it is a .gguf file; the one .gguf in a folder without config.json;
    None for an HF folder. A folder with several .gguf files is ambiguous (an error)."""
    if os.path.isfile(path):
        if path.endswith(".gguf") or _has_magic(path):
            return path
        return None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds {len(found)} GGUF files ({', '.join(found)}); "
                              "pass the one to load")
    return os.path.join(path, found[0]) if found else None


def _has_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _UnknownType(ValueError):
    pass


def _reader_class() -> type:
    from gguf import GGMLQuantizationType, GGUFReader

    class Reader(GGUFReader):
        """gguf's reader, naming the tensor whose type it does not know."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            known = {int(t) for t in GGMLQuantizationType}
            for field in fields:
                raw = int(field.parts[4][0])
                if raw not in known:
                    name = bytes(field.parts[1]).decode("utf-8", "replace")
                    raise _UnknownType(f"tensor {name!r} has unknown type {raw}")
            super()._build_tensors(start_offs, fields)

    return Reader


class GGUFFile:
    """Metadata and tensors of one GGUF file (tensor data stays in the file's mapping)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        if not _has_magic(path):
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        try:
            self.reader = _reader_class()(path, "c")  # copy-on-write views; file untouched
        except _UnknownType as e:
            raise CheckpointError(f"{path}: {e}") from e
        except (ValueError, IndexError, OverflowError, TypeError, KeyError) as e:
            size = os.path.getsize(path)
            raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({size} bytes; "
                                  f"reading it failed with: {e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        end = max((int(t.data_offset) + int(t.n_bytes) for t in self.reader.tensors), default=0)
        if end > os.path.getsize(path):
            raise CheckpointError(f"{path}: truncated GGUF file ({os.path.getsize(path)} bytes, "
                                  f"its tensors need {end})")

    def meta(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception as e:  # a malformed field
            raise CheckpointError(f"{self.path}: metadata key {key!r} is malformed ({e})") from e

    def vocab_size(self) -> int:
        field = self.reader.fields.get("tokenizer.ggml.tokens")
        return len(field.data) if field is not None else 0

    def hf_config(self) -> dict[str, Any]:
        try:
            hf = hf_config(self.meta, self.vocab_size(), set(self.tensors), self.path)
        except MetadataError as e:
            raise CheckpointError(str(e)) from e
        if (freqs := self.tensors.get("rope_freqs.weight")) is not None:
            # Llama 3.1's rope scaling, stored by llama.cpp as one divisor per frequency
            import numpy as np

            hf["rope_scaling"] = {"rope_type": "freq_factors",
                                  "factors": np.asarray(freqs.data, np.float32).ravel().tolist()}
        hf["torch_dtype"] = self.torch_dtype()
        return hf

    def torch_dtype(self) -> str:
        """The dtype `--dtype auto` picks: bfloat16 for a BF16 file, else float32
        (F16 widened exactly; quantized weights stay quantized and compute in float32)."""
        kinds = {t.tensor_type.name for t in self.reader.tensors if len(t.shape) >= 2}
        return "bfloat16" if kinds == {"BF16"} else "float32"


@functools.lru_cache(maxsize=2)
def open_gguf(path: str) -> GGUFFile:
    """The file opened once per process (the config, tokenizer and weights share it)."""
    return GGUFFile(os.path.abspath(path))
