"""All decoder layers of a decode step in one native call, for the models that qualify.

At batch 1 a small model's step is bound by what surrounds its matmuls: SmolLM2-135M
makes ~8 native calls per layer (norm, QKV, attention, O, add+norm, gate/up, SiLU, down)
through ~250 Python-level calls per step (module dispatch, argument checks, the forward
context). `DecodePlan` (yun/kernels/decode_step.cpp) holds every layer's weights once and
makes the same native calls in the same order from C++, so the output is the Python
path's bit for bit; the Python layers stay the reference and the fallback.

A model qualifies when every layer is the plain Llama skeleton (its `plain_skeleton()`
says so: yun/models/decoder.py's DecoderLayer, Attention without q/k norms, MLP) over GGUF-quantized weights
(QuantLinear) that the native kernels run, or over dense float32 / bfloat16 weights
(Linear, MergedLinear; bf16 where the backend runs the native bf16 kernels), and the step qualifies when it is decodes only
on the native CPU kernels with the cache in the activations' dtype. Anything else (float16
weights, Qwen3's q/k norms, MoE, prefill, speculative verification, an int8 cache)
takes the Python path, and so does a model with two KV-cache groups (sliding and full
layers: the plan takes one block table for every layer).
"""

from __future__ import annotations

from typing import Any

import torch

from yun.layers import fused, quantized
from yun.layers.backend import Backend, QuantKernels, current
from yun.layers.context import get_forward_context
from yun.layers.linear import SKINNY_MAX_ROWS, Linear, MergedLinear
from yun.layers.norm import RMSNorm
from yun.layers.quant_linear import FLOAT_TYPES, QuantLinear

_NATIVE_TYPES = quantized._NATIVE | frozenset(FLOAT_TYPES)


_DENSE_TYPES = {dtype: qtype for qtype, dtype in FLOAT_TYPES.items()}  # torch dtype -> ggml type


def _linear_parts(lin: object, dense_bf16: bool) -> tuple[list[torch.Tensor], list[int], int, Any] | None:
    """(part tensors, their ggml types, input features, bias) of a QuantLinear, or of a
    dense Linear / MergedLinear (one float part), the plan can run, else None. A dense
    bf16 weight qualifies only where the Python path runs the native bf16 kernels too
    (`dense_bf16`), so that both paths make the same calls."""
    if type(lin) in (Linear, MergedLinear):
        w = lin.weight.data
        qtype = _DENSE_TYPES.get(w.dtype)
        if (qtype is None or w.device.type != "cpu" or not w.is_contiguous()
                or (w.dtype == torch.bfloat16 and not dense_bf16) or w.dtype == torch.float16):
            return None
        bias = lin.bias.data if lin.bias is not None else None
        return [w], [qtype], w.shape[1], bias
    if type(lin) is not QuantLinear:
        return None
    w = lin.qweight
    if any(q not in _NATIVE_TYPES for q in w.qtypes):
        return None
    parts = [w._buffers[key] for key in w._keys]
    if any(p.device.type != "cpu" for p in parts):
        return None
    bias = lin.bias.data if lin.bias is not None else None
    return parts, list(w.qtypes), w.cols, bias


def _qualifies(layer: object) -> bool:
    plain = getattr(layer, "plain_skeleton", None)
    return (callable(plain) and plain()
            and type(layer.input_layernorm) is RMSNorm
            and type(layer.post_attention_layernorm) is RMSNorm)


def _build(layers: list[Any], ops: Any, backend: QuantKernels | None,
           dense_bf16: bool, native_f32: bool) -> Any | None:
    """A DecodePlan over `layers`, or None when one of them does not qualify. Without
    quantized kernels (`backend` None) only dense float weights qualify."""
    if not layers or not all(_qualifies(layer) for layer in layers):
        return None
    first = layers[0]
    a0, eps = first.self_attn, first.input_layernorm.eps
    dtype = first.input_layernorm.weight.dtype
    if backend is None:
        plan = ops.DecodePlan(0, "", "", a0.h, a0.kvh, a0.scale, eps, native_f32)
    else:
        plan = ops.DecodePlan(backend.module.matmul_address(), backend.isa,
                              backend.activations, a0.h, a0.kvh, a0.scale, eps, native_f32)
    for layer in layers:
        a = layer.self_attn
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if ((a.h, a.kvh, a.scale) != (a0.h, a0.kvh, a0.scale)
                or any(n.eps != eps or n.weight.dtype != dtype for n in norms)):
            return None
        lins = [_linear_parts(m, dense_bf16) for m in _linears(layer)]
        if any(lin is None for lin in lins):
            return None
        if backend is None and any(q not in FLOAT_TYPES for lin in lins for q in lin[1]):
            return None
        dense = [type(m) is not QuantLinear for m in _linears(layer)]
        plan.add_layer(norms[0].weight.data, norms[1].weight.data, [lin[0] for lin in lins],
                       [lin[1] for lin in lins], [lin[2] for lin in lins],
                       [lin[3] for lin in lins], a.window or 0, dense)
    return plan


def _has_dense_bf16(layers: list[Any]) -> bool:
    return any(type(m) in (Linear, MergedLinear) and m.weight.dtype == torch.bfloat16
               for layer in layers for m in _linears(layer))


def _linears(layer: Any) -> tuple[Any, Any, Any, Any]:
    """A layer's four linears, in the plan's order: qkv, o, gate_up, down."""
    a = layer.self_attn
    return a.qkv_proj, a.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def _plan_for(model: torch.nn.Module, layers: list[Any], kernels: Backend) -> Any | None:
    """The model's plan for these kernels (built on first use, rebuilt for other
    kernels), or None where it does not qualify."""
    backend, ops = kernels.quant, kernels.fused
    if ops is None or not hasattr(ops, "DecodePlan"):
        return None
    dense_bf16, native_f32 = kernels.bf16 is not None, kernels.f32 is not None
    key = (id(ops), None if backend is None else (id(backend.module), backend.isa,
                                                  backend.activations), dense_bf16, native_f32)
    cached = model.__dict__.get("_decode_plan")
    if cached is None or cached[0] != key:
        plan = _build(layers, ops, backend, dense_bf16, native_f32)
        cached = (key, plan, plan is not None and _has_dense_bf16(layers))
        model.__dict__["_decode_plan"] = cached
    return cached[1]


def run_layers(model: torch.nn.Module, layers: list[Any], x: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Every layer of a decode step through the plan -> the last layer's output [B, E],
    or None where this step or this model takes the Python path."""
    if not getattr(model, "use_decode_plan", True):
        return None
    ctx = get_forward_context()
    meta = ctx.attn
    kernels = current()
    if (meta.num_decodes != x.shape[0] or meta.prefills or meta.sliding is not None
            or kernels.decode is None
            or not fused.usable(x) or x.dtype != cos.dtype or cos.dim() != 2):
        return None
    caches = ctx.kv_caches
    if len(caches) != len(layers) or any(c.dtype != x.dtype for c in caches):
        return None
    plan = _plan_for(model, layers, kernels)
    if plan is None or x.dtype != layers[0].input_layernorm.weight.dtype:
        return None
    if (x.shape[0] > SKINNY_MAX_ROWS and kernels.bf16 is not None
            and kernels.bf16[1] is not torch.nn.functional.linear
            and model.__dict__["_decode_plan"][2]):
        return None  # dense bf16 rows beyond the GEMV's: the plan would not call this GEMM
    if (kernels.quant is not None and kernels.quant.many_rows is not None
            and x.shape[0] >= kernels.quant.many_rows_from):
        return None  # the Python path's quantized matmuls take the bf16 GEMM at this many rows
    return plan.run(x, cos, sin, caches, meta.slot_mapping, meta.decode_block_tables,
                    meta.decode_context_lens)
