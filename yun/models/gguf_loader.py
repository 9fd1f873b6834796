"""GGUF tensors -> a yun model.

GGUF names (`blk.3.attn_q.weight`) are mapped to the Hugging Face names our models load
(`model.layers.3.self_attn.q_proj.weight`), and the shared loader (`load_tensors`) puts
them in place, so HF folders and GGUF files fill the same modules. Three layout changes
of llama.cpp's converter are undone here:
- `llama`: Q and K rows are permuted per head for GGML's interleaved rotary; we use the
  HF (rotate-half) layout, so the rows are put back.
- MoE experts are stacked into one 3-D tensor per projection: split per expert.
- DeepSeek-V3's kv_b_proj is split into k_b (transposed) and v_b: merged back.
Quantized tensors of `Linear` layers and of the token embedding stay quantized.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterator

import torch
from gguf import GGMLQuantizationType

from yun.config import ModelConfig
from yun.layers import quantized
from yun.layers.quant_linear import FLOAT_TYPES, QuantTensor
from yun.models.errors import CheckpointError
from yun.models.gguf_file import GGUFFile
from yun.models.slices import GGUFEntry

# GGUF name pattern -> HF name template ({0}, {1}, ... are the pattern's groups).
_NAMES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), t) for p, t in [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", "model.layers.{0}.self_attn.{1}_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", "model.layers.{0}.mlp.{1}_proj.{2}"),
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", "model.layers.{0}.mlp.gate.weight"),
    (r"blk\.(\d+)\.ffn_gate_inp_shexp\.weight", "model.layers.{0}.mlp.shared_expert_gate.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight", "model.layers.{0}.mlp.{shared}.{1}_proj.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", "model.layers.{0}.mlp.experts.{{e}}.{1}_proj.weight"),
    (r"blk\.(\d+)\.exp_probs_b\.bias", "model.layers.{0}.mlp.gate.e_score_correction_bias"),
    # DeepSeek-V3 multi-head latent attention
    (r"blk\.(\d+)\.attn_q_a\.weight", "model.layers.{0}.self_attn.q_a_proj.weight"),
    (r"blk\.(\d+)\.attn_q_a_norm\.weight", "model.layers.{0}.self_attn.q_a_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q_b\.weight", "model.layers.{0}.self_attn.q_b_proj.weight"),
    (r"blk\.(\d+)\.attn_kv_a_mqa\.weight", "model.layers.{0}.self_attn.kv_a_proj_with_mqa.weight"),
    (r"blk\.(\d+)\.attn_kv_a_norm\.weight", "model.layers.{0}.self_attn.kv_a_layernorm.weight"),
    (r"blk\.(\d+)\.attn_kv_b\.weight", "model.layers.{0}.self_attn.kv_b_proj.weight"),
    (r"blk\.(\d+)\.attn_(k|v)_b\.weight", "model.layers.{0}.self_attn.{1}_b"),
]]

_SKIPPED = ("rope_freqs.weight",)  # read into the config (llama3 frequency factors)


def hf_name(gguf_name: str, arch: str) -> str | None:
    for pattern, template in _NAMES:
        if m := pattern.fullmatch(gguf_name):
            shared = "shared_experts" if arch == "deepseek2" else "shared_expert"
            return template.format(*m.groups(), shared=shared)
    return None


def quant_tensor(gf: GGUFFile, name: str) -> QuantTensor:
    """A GGUF tensor as a QuantTensor over the file's mapping (no copy)."""
    t = gf.tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # torch order
    qtype = int(t.tensor_type)
    if qtype not in FLOAT_TYPES and qtype not in quantized.supported_qtypes():
        raise CheckpointError(
            f"{gf.path}: tensor {name!r} has type {t.tensor_type.name}, which yun does not "
            "support; supported: F32, F16, BF16, "
            + ", ".join(GGMLQuantizationType(q).name for q in quantized.supported_qtypes()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy memmap -> torch: shared, that is the point
        data = torch.from_numpy(t.data)
    if qtype in FLOAT_TYPES:
        if qtype == 30:  # BF16 arrives as raw bytes
            data = data.view(torch.int16).view(torch.bfloat16)
        data = data.reshape(shape)
    else:
        data = data.reshape(-1, data.shape[-1]) if len(shape) <= 2 else data
    return QuantTensor(qtype, data, shape, name)


def _unpermute_index(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's per-head interleave of Q/K rows."""
    d = rows // n_head
    return torch.arange(rows).view(n_head, d // 2, 2).transpose(1, 2).reshape(-1)


def gguf_tensors(gf: GGUFFile, cfg: ModelConfig
                 ) -> Iterator[tuple[str, str, QuantTensor | GGUFEntry]]:
    """(file, HF name, tensor) for every tensor of the file, in HF layout. Each is a view
    of the file's mapping (llama's Q/K: an entry whose rows are reordered as they are
    read), so a tensor-parallel rank copies only the rows or blocks it keeps."""
    arch = cfg.hf.get("gguf_architecture", "")
    pending_kv_b: dict[str, dict[str, QuantTensor]] = {}
    for name in gf.tensors:
        if name in _SKIPPED:
            continue
        target = hf_name(name, arch)
        if target is None:
            raise CheckpointError(f"{gf.path}: unexpected tensor {name!r} "
                                  f"(not part of a {arch} model yun knows)")
        t = quant_tensor(gf, name)
        if arch == "llama" and re.search(r"\.(q|k)_proj\.", target):
            heads = cfg.num_heads if ".q_proj." in target else cfg.num_kv_heads
            entry = GGUFEntry(t, _unpermute_index(t.shape[0], heads))  # rows read lazily
            yield gf.path, target, entry
            continue
        if "{e}" in target:  # stacked experts [X, out, in] -> one tensor per expert
            dense = t.dequantize()
            for e in range(dense.shape[0]):
                yield gf.path, target.format(e=e), _dense(dense[e], name)
            continue
        if target.endswith(("self_attn.k_b", "self_attn.v_b")):
            prefix, part = target.rsplit(".", 1)
            got = pending_kv_b.setdefault(prefix, {})
            got[part] = t
            if len(got) == 2:
                yield gf.path, f"{prefix}.kv_b_proj.weight", _merge_kv_b(got, name)
                del pending_kv_b[prefix]
            continue
        if target.endswith("shared_expert_gate.weight") and len(t.shape) == 1:
            t = _dense(t.dequantize().reshape(1, -1), name)
        yield gf.path, target, t
    if pending_kv_b:
        prefix = next(iter(pending_kv_b))
        raise CheckpointError(f"{gf.path}: {prefix}: attn_k_b and attn_v_b come in pairs; "
                              "one is missing")


def _dense(x: torch.Tensor, name: str) -> QuantTensor:
    return QuantTensor(0, x.contiguous(), tuple(x.shape), name)


def _merge_kv_b(parts: dict[str, QuantTensor], name: str) -> QuantTensor:
    k_b = parts["k_b"].dequantize()  # [H, L, Dn] (llama.cpp stores it transposed)
    v_b = parts["v_b"].dequantize()  # [H, Dv, L]
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [H, Dn + Dv, L]
    return _dense(kv_b.reshape(-1, kv_b.shape[-1]), name)

