"""Reading only part of a checkpoint tensor: what a tensor-parallel rank keeps of one
parameter (`Cut`), and checkpoint entries that read just that part.

A `Cut` says, in the full (unsharded) model's coordinates, which positions along one
dimension of a parameter this rank keeps; the parameter already has the cut shape (the
model was built on the meta device and sharded there, see yun/distributed/tp.py). The
loader reads each checkpoint tensor through its entry's `read(dim, index)`:
- safetensors: `safe_open(...).get_slice(name)[...]`, one contiguous span at a time;
- GGUF (memory-mapped blocks): whole rows of blocks for a cut along the output rows,
  whole blocks of every row for a cut along the input columns; a column cut that would
  split a quant block dequantizes that one tensor (a warning names it) and cuts the floats.
Entries count the bytes they hand out, so a test can see what a rank materialised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from yun.layers.quant_linear import QuantTensor


@dataclass(frozen=True)
class Cut:
    """What this rank keeps of one parameter.

    dim: the parameter's dimension that is cut (None: nothing read; see `zero`).
    index: [kept] positions along `dim` of the full parameter, in order; the parameter's
      first len(index) positions along `dim` get them, any further ones are zero (a padded
      vocabulary shard).
    full_sizes: the fused parts' sizes along `dim` before the cut (a QKV or gate-up
      projection, cut along its output rows), else None.
    zero: the parameter is all zeros on this rank (a row-parallel bias off rank 0).
    """

    dim: int | None
    index: torch.Tensor | None = None
    full_sizes: tuple[int, ...] | None = None
    zero: bool = False

    def part_index(self, part: int) -> torch.Tensor:
        """The positions kept of fused part `part`, in the part's own coordinates."""
        assert self.index is not None and self.full_sizes is not None
        start = sum(self.full_sizes[:part])
        end = start + self.full_sizes[part]
        mine = (self.index >= start) & (self.index < end)
        return self.index[mine] - start

    def full_length(self, part: int | None) -> int | None:
        """The full size along `dim` of the whole parameter or of one part (None: unknown)."""
        if self.full_sizes is None:
            return None
        return self.full_sizes[part] if part is not None else sum(self.full_sizes)


def spans(index: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted runs [start, end) of consecutive positions, in the index's order."""
    out: list[tuple[int, int]] = []
    for i in index.tolist():
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def cut_dense(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(dim, index.to(x.device)).contiguous()


class Entry:
    """A checkpoint tensor not read yet: its shape, and `read` of all or a cut of it."""

    shape: tuple[int, ...]

    def read(self, dim: int | None = None, index: torch.Tensor | None = None) -> Any:
        raise NotImplementedError


class SafetensorsEntry(Entry):
    def __init__(self, handle: Any, name: str):
        self.handle, self.name = handle, name
        self.shape = tuple(handle.get_slice(name).get_shape())

    def read(self, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        if dim is None or index is None:
            return self.handle.get_tensor(self.name)
        view = self.handle.get_slice(self.name)
        lead = (slice(None),) * dim
        return torch.cat([view[lead + (slice(s, e),)] for s, e in spans(index)], dim=dim)


class GGUFEntry(Entry):
    """A GGUF tensor over the file's mapping; `rows` reorders its rows first (llama's
    un-permuted Q/K), applied lazily so only the rows kept are copied."""

    def __init__(self, tensor: QuantTensor, rows: torch.Tensor | None = None):
        self.tensor, self.rows = tensor, rows
        self.shape = tuple(tensor.shape)

    def read(self, dim: int | None = None, index: torch.Tensor | None = None) -> QuantTensor:
        t = self.tensor
        if dim is None or index is None:
            return t if self.rows is None else t.take_rows(self.rows)
        if dim == 0:
            return t.take_rows(index if self.rows is None else self.rows[index])
        if dim == 1 and len(self.shape) == 2:
            source = t if self.rows is None else t.take_rows(self.rows)
            return _take_cols(source, index)
        raise ValueError(f"{t.name}: cannot cut a {len(self.shape)}-D GGUF tensor along {dim}")


def _take_cols(t: QuantTensor, index: torch.Tensor) -> QuantTensor:
    """Columns `index` of a 2-D tensor: whole quant blocks of each row when every span
    starts and ends on a block boundary, else (a warning) the dequantized floats."""
    if t.is_float:
        data = cut_dense(t.data, 1, index)
        return QuantTensor(t.qtype, data, (t.shape[0], data.shape[1]), t.name)
    from yun.layers.quantized import block_info

    block, size = block_info(t.qtype)
    runs = spans(index)
    if all(s % block == 0 and e % block == 0 for s, e in runs):
        data = torch.cat([t.data[:, s // block * size:e // block * size] for s, e in runs], 1)
        return QuantTensor(t.qtype, data.contiguous(), (t.shape[0], int(index.numel())), t.name)
    warnings.warn(f"{t.name}: this rank's columns split a {block}-value quant block; the "
                  "tensor is dequantized to float32 on this rank", stacklevel=2)
    dense = cut_dense(t.dequantize(), 1, index)
    return QuantTensor(0, dense, tuple(dense.shape), t.name)


def read_entry(entry: Any, dim: int | None = None, index: torch.Tensor | None = None) -> Any:
    """A tensor, QuantTensor or Entry, read whole or cut along `dim`."""
    if isinstance(entry, Entry):
        return entry.read(dim, index)
    if dim is None or index is None:
        return entry
    if isinstance(entry, QuantTensor):
        return GGUFEntry(entry).read(dim, index)
    return cut_dense(entry, dim, index)


def shape_of(entry: Any) -> tuple[int, ...]:
    return tuple(entry.shape)


def nbytes(x: Any) -> int:
    """Bytes a tensor or QuantTensor holds."""
    if isinstance(x, QuantTensor):
        return x.nbytes
    return x.numel() * x.element_size()
