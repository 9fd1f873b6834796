"""The reference side of the GGUF tests, independent of yun's loader.

- `read_gguf`: a small reader of a GGUF file's header (metadata, tensor infos and the byte
  offset of each field). gguf.GGUFReader builds a numpy view per token string, seconds
  for a 49k-152k vocabulary on this machine; this reads the same in a fraction of that,
  and the error tests need the offsets to corrupt a copy.
- `file_tensors`: every tensor of a file dequantized with gguf-py, in torch layout (the
  file's dims reversed).
- `rounded_reference`: the HF model a GGUF file was converted from, holding the file's
  numbers. Each HF weight goes through what convert_hf_to_gguf.py does to it (rename,
  Q/K row permutation for llama, expert split, kv_b split), is rounded there to the
  file's type for that tensor and compared with the file's tensor: equal bit for bit
  (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1), or within the type's error (K-quants, whose
  scale search gguf-py does not reproduce). The file's tensor is then mapped back. The
  comparison proves the test's picture of the converter's layout.
- `transformers_reference`: transformers loading the GGUF itself.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

# GGUF value types -> struct format (8 string, 9 array handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # the file's dims: ne[0] is the contiguous one
    qtype: int
    offset: int  # of the data, relative to data_start
    type_field_offset: int  # absolute byte offset of the u32 type field


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, int | None]]  # key -> (type, array item type)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype == STRING:
                return [self.string() for _ in range(n)]
            fmt = _SCALARS[itype]
            size = struct.calcsize(fmt)
            vals = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
            self.pos += n * size
            return vals
        return self.unpack(_SCALARS[vtype])


def read_gguf(path: str) -> GGUFHeader:
    with open(path, "rb") as f:
        buf = f.read()
    c = _Cursor(buf)
    assert buf[:4] == b"GGUF", f"{path} is not a GGUF file"
    c.pos = 4
    version, n_tensors, n_kv = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
    header = GGUFHeader(path, version, {}, {})
    for _ in range(n_kv):
        key, vtype = c.string(), c.unpack("<I")
        item = struct.unpack_from("<I", buf, c.pos)[0] if vtype == ARRAY else None
        header.metadata[key] = c.value(vtype)
        header.value_types[key] = (vtype, item)
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.unpack("<I")
        ne = tuple(c.unpack("<Q") for _ in range(n_dims))
        type_pos = c.pos
        qtype, offset = c.unpack("<I"), c.unpack("<Q")
        header.tensors[name] = TensorInfo(name, ne, qtype, offset, type_pos)
    align = header.metadata.get("general.alignment", 32)
    header.data_start = (c.pos + align - 1) // align * align
    return header


def file_tensors(path: str,
                 header: GGUFHeader | None = None) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (type name, float32 tensor in torch layout), dequantized by gguf-py."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    header = header or read_gguf(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for t in header.tensors.values():
        qtype = GGMLQuantizationType(t.qtype)
        block, size = GGML_QUANT_SIZES[qtype]
        row_bytes = t.ne[0] // block * size
        rows = math.prod(t.ne[1:])
        start = header.data_start + t.offset
        data = np.array(raw[start:start + rows * row_bytes]).reshape(rows, row_bytes)
        values = dequantize(data, qtype).astype(np.float32)
        out[t.name] = (qtype.name, torch.from_numpy(values.reshape(tuple(reversed(t.ne)))))
    return out


# Types whose rounding gguf-py reproduces bit for bit (llama-quantize's reference code);
# for the others the file's numbers are checked against the HF weight's size of error:
# relative RMS error on these Gaussian weights is 0.30 (Q2_K), 0.15, 0.07, 0.036, 0.018
# (Q6_K); a wrong layout or scale gives 1 or more.
EXACT_ROUNDING = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
K_QUANT_ERROR = {"Q2_K": 0.5, "Q3_K": 0.3, "Q4_K": 0.15, "Q5_K": 0.08, "Q6_K": 0.04}


def round_like(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """`t` (float32) rounded to a GGUF type along its last dim, back in float32."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    if qtype == "F32":
        return t
    if qtype == "F16":
        return t.half().float()
    if qtype == "BF16":
        return t.bfloat16().float()
    q = GGMLQuantizationType[qtype]
    arr = t.detach().contiguous().numpy()
    return torch.from_numpy(dequantize(quantize(arr, q), q).astype(np.float32)).reshape(t.shape)


# --- convert_hf_to_gguf.py's tensor layout, both ways -----------------------------------

Images = dict[str, torch.Tensor]  # GGUF name -> tensor in the file's torch layout

PLAIN = [  # HF name (regex) -> GGUF name
    (r"model\.embed_tokens\.weight", r"token_embd.weight"),
    (r"lm_head\.weight", r"output.weight"),
    (r"model\.norm\.weight", r"output_norm.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", r"blk.\1.attn_q_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"blk.\1.attn_q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", r"blk.\1.attn_q_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight",
     r"blk.\1.attn_kv_a_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight",
     r"blk.\1.attn_kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj", r"blk.\1.ffn_down_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts?\.(gate|up|down)_proj\.weight",
     r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
]


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: rows of each head from halves
    (rotate_half order) to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def llama_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


Layout = tuple[Callable[[torch.Tensor], Images], Callable[[Images], torch.Tensor]]


def layout_of(name: str, arch: str, cfg: dict) -> Layout:
    """(to the file, back from the file) for one HF tensor of a model of GGUF arch `arch`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj", name)
    if m:  # [E, 2 * ff, hidden] -> ffn_gate_exps and ffn_up_exps, each [E, ff, hidden]
        g, u = f"blk.{m[1]}.ffn_gate_exps.weight", f"blk.{m[1]}.ffn_up_exps.weight"
        return (lambda t: dict(zip((g, u), t.chunk(2, dim=1))),
                lambda im: torch.cat([im[g], im[u]], dim=1))
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", name)
    if m:  # [H * (nope + v), rank] -> attn_k_b [H, rank, nope] and attn_v_b [H, v, rank]
        k, v = f"blk.{m[1]}.attn_k_b.weight", f"blk.{m[1]}.attn_v_b.weight"
        H, nope, vd = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]

        def split(t: torch.Tensor) -> Images:
            kb, vb = t.view(H, nope + vd, -1).split([nope, vd], dim=1)
            return {k: kb.transpose(1, 2).contiguous(), v: vb.contiguous()}

        def merge(im: Images) -> torch.Tensor:
            return torch.cat([im[k].transpose(1, 2), im[v]], dim=1).reshape(H * (nope + vd), -1)

        return split, merge
    for pattern, repl in PLAIN:
        if re.fullmatch(pattern, name):
            gname = re.sub(pattern, repl, name)
            heads = None
            if arch == "llama" and re.search(r"attn_[qk]\.weight$", gname):
                heads = cfg["num_attention_heads"] if "attn_q" in gname \
                    else cfg["num_key_value_heads"]
            if heads:
                return (lambda t, h=heads, n=gname: {n: llama_permute(t, h)},
                        lambda im, h=heads, n=gname: llama_unpermute(im[n], h))
            return (lambda t, n=gname: {n: t}), (lambda im, n=gname: im[n])
    raise KeyError(f"no GGUF name known for HF tensor {name}")


def squeeze(shape: torch.Size) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def rounded_reference(hf_dir: str, gguf_path: str) -> torch.nn.Module:
    """The HF model of `hf_dir` (float32) holding exactly `gguf_path`'s weights; raises
    AssertionError unless each file tensor is the HF tensor, laid out as the converter
    writes it and rounded to that tensor's type."""
    import transformers

    header = read_gguf(gguf_path)
    arch = header.metadata["general.architecture"]
    in_file = file_tensors(gguf_path, header)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = model.config.to_dict()
    seen: set[str] = set()
    new_state = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.startswith("lm_head") and "output.weight" not in in_file:
                continue  # tied: output is token_embd
            to_file, back = layout_of(name, arch, cfg)
            images = {}
            for gname, img in to_file(t.float()).items():
                qtype, stored = in_file[gname]
                if stored.shape != img.shape and squeeze(stored.shape) == squeeze(img.shape):
                    # llama-quantize drops trailing 1-dims (ggml_n_dims): Qwen2-MoE's
                    # shared-expert gate [1, hidden] is 2-D from the converter, 1-D after it.
                    stored = stored.reshape(img.shape)
                assert img.shape == stored.shape, \
                    f"{gname}: expected layout {tuple(img.shape)}, file has {tuple(stored.shape)}"
                if qtype in EXACT_ROUNDING:
                    diff = (round_like(img, qtype) - stored).abs().max().item()
                    assert diff == 0, f"{gguf_path} {gname} ({qtype}): rounded HF weight " \
                                      f"differs from the file's by {diff}"
                else:  # K-quants: llama.cpp searches scales; check the error's size only
                    err = ((stored - img).norm() / img.norm()).item()
                    assert err <= K_QUANT_ERROR[qtype], \
                        f"{gguf_path} {gname} ({qtype}): relative error {err:.3f}"
                images[gname] = stored
                seen.add(gname)
            new_state[name] = back(images)
    extra = set(in_file) - seen - {"rope_freqs.weight"}
    assert not extra, f"file tensors the reference does not account for: {sorted(extra)}"
    model.load_state_dict(new_state, strict=False)
    return model


def transformers_reference(gguf_path: str, config_dir: str | None = None) -> torch.nn.Module:
    """transformers loading `gguf_path` itself (dequantized to float32). With config_dir,
    it takes the HF config from there and only the tensors from the file: transformers
    ignores some metadata (expert widths) that yun reads."""
    import transformers

    kwargs: dict[str, Any] = {}
    if config_dir is not None:
        kwargs["config"] = transformers.AutoConfig.from_pretrained(config_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32, **kwargs).eval()
