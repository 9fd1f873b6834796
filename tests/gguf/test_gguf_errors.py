"""Broken GGUF files: each case raises CheckpointError (a ValueError) whose message names
the file and what is wrong with it (the tensor, the metadata key, the type), never an
exception from inside gguf, numpy or torch.

The broken files are copies of the tiny llama Q8_0 file: cut short, overwritten, or
rewritten with gguf.GGUFWriter with one thing changed."""

from __future__ import annotations

import os
import re
import shutil
import struct
from typing import Any, Callable

import numpy as np
import pytest

from tests.gguf.reference import read_gguf
from yun import LLM
from yun.models.loader import CheckpointError


def load(path: str) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=2**20, num_threads=1)


def raises_checkpoint_error(path: str, *patterns: str) -> str:
    """Loading `path` raises CheckpointError itself (not a gguf/numpy/torch exception
    that merely subclasses ValueError) naming the file and matching every pattern."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert type(info.value).__module__.startswith("yun."), type(info.value)
    assert path in message or os.path.basename(path) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def good(gguf_models) -> str:
    return gguf_models.gguf("llama", "Q8_0")


def rewrite(src: str, dst: str, arch: str | None = None, drop: tuple[str, ...] = (),
            edit_meta: Callable[[dict[str, Any]], None] | None = None,
            retype: dict[str, int] | None = None,
            replace: dict[str, tuple[np.ndarray, int]] | None = None) -> str:
    """Copy `src` to `dst` with gguf.GGUFWriter: metadata (edited by `edit_meta`, value
    types changed by `retype`, keys `{old arch}.*` renamed for `arch`), tensors (bytes as
    they are) except `drop`, and `replace`: name -> (uint8 block bytes [rows, row_bytes],
    ggml type)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

    header = read_gguf(src)
    old = header.metadata["general.architecture"]
    arch = arch or old
    meta = {k: v for k, v in header.metadata.items() if k != "general.architecture"}
    types = dict(header.value_types)
    types.update({k: (int(v), None) for k, v in (retype or {}).items()})
    if edit_meta:
        edit_meta(meta)
    writer = GGUFWriter(dst, arch)
    for key, value in meta.items():
        vtype, item = types.get(key, (GGUFValueType.UINT32, None))
        new_key = arch + key[len(old):] if key.startswith(old + ".") else key
        writer.add_key_value(new_key, value, GGUFValueType(vtype),
                             sub_type=GGUFValueType(item) if item is not None else None)
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for t in header.tensors.values():
        if t.name in drop:
            continue
        if replace and t.name in replace:
            data, qtype = replace[t.name]
            writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType(qtype))
            continue
        start = header.data_start + t.offset
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)]
        row_bytes = t.ne[0] // block * size
        data = np.array(raw[start:start + row_bytes * int(np.prod(t.ne[1:]))])
        data = data.reshape(*reversed(t.ne[1:]), row_bytes)
        writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType(t.qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_the_rewritten_copy_itself_loads(good, tmp_path):
    """The copying helper keeps a good file good (so the failures below are the edits')."""
    path = rewrite(good, str(tmp_path / "copy.gguf"))
    assert read_gguf(path).tensors.keys() == read_gguf(good).tensors.keys()
    load(path)


@pytest.mark.parametrize("where", ["in the tensor data", "in the metadata", "after the magic"])
def test_truncated_file(good, tmp_path, where):
    header = read_gguf(good)
    size = {"in the tensor data": (header.data_start + os.path.getsize(good)) // 2,
            "in the metadata": header.tensors["blk.0.attn_q.weight"].type_field_offset // 2,
            "after the magic": 6}[where]
    path = str(tmp_path / "truncated.gguf")
    with open(good, "rb") as f, open(path, "wb") as out:
        out.write(f.read(size))
    raises_checkpoint_error(path, r"(?i)truncated")


def test_random_bytes_are_not_a_gguf_file(tmp_path):
    path = str(tmp_path / "random.gguf")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    raises_checkpoint_error(path, r"(?i)not a GGUF file")


@pytest.mark.parametrize("name", ["notes.gguf", "notes.txt"])
def test_a_text_file_is_not_a_gguf_file(tmp_path, name):
    path = str(tmp_path / name)
    with open(path, "w") as f:
        f.write("this is a text file, not a model\n" * 20)
    raises_checkpoint_error(path, r"(?i)not a GGUF file")


def test_empty_file(tmp_path):
    path = str(tmp_path / "empty.gguf")
    open(path, "wb").close()
    raises_checkpoint_error(path, r"(?i)not a GGUF file|empty|truncated")


def test_unknown_architecture(good, tmp_path):
    """A real llama.cpp architecture that yun does not run: the message names it."""
    path = rewrite(good, str(tmp_path / "falcon.gguf"), arch="falcon")
    raises_checkpoint_error(path, r"falcon", r"(?i)architecture")


def test_tensor_type_id_that_ggml_does_not_know(good, tmp_path):
    """The type field of one tensor's info patched to 99 (no such ggml type)."""
    header = read_gguf(good)
    pos = header.tensors["blk.1.attn_k.weight"].type_field_offset
    path = str(tmp_path / "type99.gguf")
    shutil.copy(good, path)
    with open(path, "r+b") as f:
        f.seek(pos)
        assert struct.unpack("<I", f.read(4))[0] == 8  # Q8_0
        f.seek(pos)
        f.write(struct.pack("<I", 99))
    raises_checkpoint_error(path, r"blk\.1\.attn_k\.weight", r"\b99\b", r"(?i)type")


def test_tensor_type_yun_does_not_support(good, tmp_path):
    """A valid IQ4_NL tensor (ggml knows it; yun's dequantizers do not)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = read_gguf(good).tensors["blk.0.ffn_up.weight"]
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL]
    rows, row_bytes = int(np.prod(t.ne[1:])), t.ne[0] // block * size
    data = np.random.default_rng(0).integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    path = rewrite(good, str(tmp_path / "iq4nl.gguf"),
                   replace={t.name: (data, GGMLQuantizationType.IQ4_NL)})
    raises_checkpoint_error(path, r"blk\.0\.ffn_up\.weight", r"IQ4_NL")


def test_missing_tensor(good, tmp_path):
    path = rewrite(good, str(tmp_path / "missing.gguf"), drop=("blk.1.ffn_down.weight",))
    raises_checkpoint_error(
        path, r"(?i)missing",
        r"blk\.1\.ffn_down\.weight|model\.layers\.1\.mlp\.down_proj\.weight")


def test_tensor_with_the_wrong_shape(good, tmp_path):
    """attn_q of a 128-wide layer in a 256-wide model."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    data = np.zeros((256, 128 // block * size), dtype=np.uint8)  # [out 256, in 128]
    path = rewrite(good, str(tmp_path / "shape.gguf"),
                   replace={"blk.0.attn_q.weight": (data, GGMLQuantizationType.Q8_0)})
    raises_checkpoint_error(path, r"blk\.0\.attn_q\.weight|model\.layers\.0\.self_attn\.q_proj",
                            r"128")


def test_missing_metadata_key(good, tmp_path):
    path = rewrite(good, str(tmp_path / "nokey.gguf"),
                   edit_meta=lambda m: m.pop("llama.embedding_length"))
    raises_checkpoint_error(path, r"llama\.embedding_length")


def test_metadata_value_of_the_wrong_type(good, tmp_path):
    from gguf import GGUFValueType

    assert read_gguf(good).value_types["llama.attention.head_count"][0] == GGUFValueType.UINT32
    path = rewrite(good, str(tmp_path / "badtype.gguf"),
                   edit_meta=lambda m: m.update({"llama.attention.head_count": "four"}),
                   retype={"llama.attention.head_count": GGUFValueType.STRING})
    raises_checkpoint_error(path, r"llama\.attention\.head_count")


def test_a_folder_with_two_gguf_files_is_ambiguous(good, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    os.link(good, folder / "model-a.gguf")
    os.link(good, folder / "model-b.gguf")
    with pytest.raises(CheckpointError) as info:
        load(str(folder))
    message = str(info.value)
    assert str(folder) in message and "model-a.gguf" in message and "model-b.gguf" in message


def test_a_folder_with_no_model_says_so(tmp_path):
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    with pytest.raises((CheckpointError, FileNotFoundError, ValueError)) as info:
        load(str(folder))
    assert str(folder) in str(info.value)
