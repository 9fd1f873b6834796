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
