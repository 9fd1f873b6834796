"""Weights moved into one huge-page mapping keep their values, sharing and dtype."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from yun.models import huge_pages


def anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup", encoding="utf-8") as f:
        return int(re.search(r"AnonHugePages:\s+(\d+)", f.read()).group(1))


@pytest.mark.skipif(not huge_pages.thp_available(), reason="no transparent huge pages here")
def test_parameters_move_into_one_huge_page_arena(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4096, 512), nn.Linear(512, 4096, bias=True))
    model.to(torch.bfloat16)
    model[1].weight = model[0].weight  # tied, as in Qwen2.5-0.5B
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 4096, (3,))
    want = model(x)
    huge_before = anon_huge_kib()

    size = huge_pages.place_in_huge_pages(model)

    assert size >= sum(p.numel() * 2 for p in model.parameters()) and size % (2 << 20) == 0
    assert model[1].weight is model[0].weight  # still one tensor
    ptrs = sorted(p.data_ptr() for p in model.parameters())
    assert ptrs[-1] - ptrs[0] < size and all(p % huge_pages.ALIGN == 0 for p in ptrs)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.is_contiguous() and torch.equal(p, before[n])
    assert torch.equal(model(x), want)
    assert anon_huge_kib() > huge_before  # the kernel did back it with huge pages


def test_small_models_are_left_alone():
    model = nn.Linear(8, 8)
    ptr = model.weight.data_ptr()
    assert huge_pages.place_in_huge_pages(model) == 0
    assert model.weight.data_ptr() == ptr


@pytest.mark.skipif(not huge_pages.thp_available(), reason="no transparent huge pages here")
def test_quantized_blocks_held_as_buffers_move_too(monkeypatch):
    """A GGUF file's quantized weights are module buffers (QuantWeight), not parameters:
    they stream every token as well. Two buffers over the same bytes (one file mapping,
    or a tied embedding) share one copy; the matmul's result does not change."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT, quantize

    from yun.layers.quant_linear import QuantTensor, QuantWeight

    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    rng = np.random.default_rng(0)
    blocks = torch.from_numpy(quantize(rng.standard_normal((64, 256)).astype(np.float32),
                                       QT.Q8_0))
    model = nn.Module()
    model.a = QuantWeight([QuantTensor(int(QT.Q8_0), blocks, (64, 256), "a.weight")])
    model.b = QuantWeight([QuantTensor(int(QT.Q8_0), blocks[:], (64, 256), "b.weight")])
    model.a.register_buffer("odd", blocks.t(), persistent=False)  # not contiguous: stays
    x = torch.randn(3, 256)
    want = model.a.matmul(x)
    before = blocks.data_ptr()

    size = huge_pages.place_in_huge_pages(model)

    assert size >= blocks.numel() and size % (2 << 20) == 0
    a, b = model.a.part0, model.b.part0
    assert a.data_ptr() != before and a.data_ptr() == b.data_ptr()  # moved, once
    assert model.a.odd.data_ptr() == before  # a transposed view keeps its layout and place
    assert torch.equal(a, blocks) and torch.equal(model.a.matmul(x), want)
