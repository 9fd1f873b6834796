"""The model's cost per token and the ceilings' arithmetic (no timing involved)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from yun.bench.metrics import RequestRecord, RunResult
from yun.bench.roofline import (ModelCost, Probe, Roofline, attach_ceiling, measure_bandwidth,
                                measure_matmul, model_cost)
from yun.bench.workloads import BenchRequest
from tests.conftest import BASE

H, I, V, L = BASE["hidden_size"], BASE["intermediate_size"], BASE["vocab_size"], \
    BASE["num_hidden_layers"]


def test_tied_checkpoint_costs_every_weight_once_plus_the_lm_head(qwen2_path):
    c = model_cost(qwen2_path)
    kv = BASE["num_key_value_heads"] * (H // BASE["num_attention_heads"])
    per_layer = (H * H + H) + 2 * (kv * H + kv) + H * H + 3 * H * I + 2 * H  # attn, mlp, norms
    assert c.layer_params == L * per_layer + H  # + the final norm
    assert c.embedding_params == c.lm_head_params == V * H  # tied: the embedding is lm_head
    assert c.total_params == c.layer_params + c.embedding_params
    assert (c.dtype, c.bytes_per_param) == ("float32", 4)
    assert c.weight_bytes_per_token == (c.layer_params + V * H + H) * 4
    assert model_cost(qwen2_path, "bfloat16").bytes_per_param == 2


def test_moe_experts_count_at_top_k_over_num_experts(tmp_path):
    from safetensors.torch import save_file

    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 16,
           "num_experts": 4, "num_experts_per_tok": 1, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    w = {"model.embed_tokens.weight": torch.zeros(16, 8), "lm_head.weight": torch.zeros(16, 8),
         "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}
    for e in range(4):
        w[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = torch.zeros(4, 8)
    w["model.layers.0.mlp.shared_experts.up_proj.weight"] = torch.zeros(4, 8)
    save_file(w, str(tmp_path / "model.safetensors"))
    c = model_cost(str(tmp_path))
    assert c.layer_params == 64 + 32 + 32  # q_proj + one expert of four + the shared expert
    assert c.lm_head_params == 128 and c.embedding_params == 128
    assert c.bytes_per_param == 2


def _roof(bandwidth=1e9, flops=1e9) -> Roofline:
    cost = ModelCost(dtype="float32", bytes_per_param=4, layer_params=1000, lm_head_params=500,
                     embedding_params=500, hidden_size=10, total_params=2000)
    return Roofline(bandwidth=bandwidth, flops=flops, cost=cost, threads=1)


def test_floor_is_the_larger_of_compute_and_memory_time():
    roof = _roof()
    reqs = [BenchRequest([1, 2, 3, 4], 10), BenchRequest([1, 2, 9], 6)]  # shares 2 tokens
    f = roof.floor(reqs)
    # computed prompt tokens 4 + 1 = 5; fed tokens 5 + 16 - 2 = 19
    assert f["compute_floor_s"] == pytest.approx(2 * (19 * 1000 + 16 * 500) / 1e9)
    # two at once: at least 10 steps (the longest output), each reading every weight
    assert f["memory_floor_s"] == pytest.approx(10 * (1500 + 10) * 4 / 1e9)
    assert f["floor_s"] == max(f["compute_floor_s"], f["memory_floor_s"])
    assert roof.ceiling(reqs) == pytest.approx(16 / f["floor_s"])
    # one at a time: 16 steps
    assert roof.floor(reqs, concurrency=1)["memory_floor_s"] == pytest.approx(16 * 1510 * 4 / 1e9)
    assert roof.decode_ceiling == pytest.approx(1e9 / (1510 * 4))
    assert _roof(flops=1e3).decode_ceiling == pytest.approx(1e3 / (2 * 1500))


def test_attach_ceiling_reports_fractions_of_the_ceilings():
    roof = _roof()
    reqs = [BenchRequest([1, 2, 3], 4)]
    rec = RequestRecord(prompt_tokens=3, output_tokens=4, ttft=0.1, e2e=1.0)
    res = RunResult("x", "single", duration=2.0, records=[rec],
                    extra={"decode_tokens_per_s": 3.0})
    attach_ceiling(res, roof, reqs)
    assert res.extra["ceiling_tokens_per_s"] == pytest.approx(roof.ceiling(reqs))
    assert res.extra["fraction_of_ceiling"] == pytest.approx(2.0 / roof.ceiling(reqs))
    assert res.extra["decode_fraction_of_ceiling"] == pytest.approx(3.0 / roof.decode_ceiling)


def test_probes_measure_positive_rates_quickly():
    bw = measure_bandwidth(4 * 2**20, repeats=1)
    mm = measure_matmul([(16, 32, 64)], repeats=1)
    assert {p.name for p in bw} >= {"copy fp32 (read+write)", "sum fp32", "sum bf16"}
    assert all(isinstance(p, Probe) and p.value > 0 and math.isfinite(p.value) for p in bw + mm)
    assert {p.name for p in mm} == {"matmul float32", "matmul bfloat16"}
