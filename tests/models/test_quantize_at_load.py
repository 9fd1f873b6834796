"""`--quantization`: an HF checkpoint's linear layers and embedding quantized into GGUF
block types while loading. The reference is transformers on the same checkpoint with each
of those weights replaced by dequantize(quantize(W)) (gguf-py's own quantizer and
dequantizer), so the only difference left is float rounding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from tests.helpers import assert_logits_match, reference_model
from yun.config import EngineConfig
from yun.engine.engine import LLMEngine
from yun.layers.quant_linear import QuantEmbedding, QuantLinear
from yun.models.weight_stats import weight_bytes


def _round_trip(ref: torch.nn.Module, kind: str) -> None:
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2 and ("proj" in name or "embed_tokens" in name or "lm_head" in name):
                w = p.detach().float().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, qtype), qtype).astype(np.float32)))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_1"])
def test_quantized_logits_equal_the_round_tripped_reference(qwen2_path, kind):
    engine = LLMEngine(EngineConfig(model=qwen2_path, dtype="float32", quantization=kind,
                                    native_kernels=False, kv_cache_memory=16 * 2**20))
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; the (tied) head
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert {q for m in linears for q in m.qweight.qtypes} == {
        int(gguf.GGMLQuantizationType[kind.upper()])}
    ref = reference_model(qwen2_path)
    _round_trip(ref, kind)
    assert_logits_match(engine, ref, f"qwen2 {kind}", tol=2e-4)


def test_quantized_weights_take_fewer_bytes(qwen2_path):
    dense = LLMEngine(EngineConfig(model=qwen2_path, dtype="float32",
                                   kv_cache_memory=16 * 2**20))
    q8 = LLMEngine(EngineConfig(model=qwen2_path, dtype="float32", quantization="q8_0",
                                kv_cache_memory=16 * 2**20))
    q4 = LLMEngine(EngineConfig(model=qwen2_path, dtype="float32", quantization="q4_0",
                                kv_cache_memory=16 * 2**20))
    full = weight_bytes(dense.runner.model)
    # Q8_0: 34 bytes per 32 weights, Q4_0: 18 (fp32: 128); norms and biases stay fp32.
    assert weight_bytes(q8.runner.model) < 0.3 * full
    assert weight_bytes(q4.runner.model) < 0.16 * full


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="q3_x")
