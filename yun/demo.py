"""The embedded demo model: a Qwen2.5-0.5B-shaped checkpoint with RANDOM weights.

No weights can be downloaded everywhere yun runs, and a newcomer should be able to try
it at once. On first use this builds, deterministically, a Hugging Face checkpoint
folder (config.json, model.safetensors, tokenizer.json with the real Qwen2 vocabulary,
tokenizer_config.json with the Qwen2.5 chat template, generation_config.json) in the
cache folder. Its text is meaningless: pass a real model (a folder or a hub id such as
Qwen/Qwen2.5-0.5B-Instruct) for real answers.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources

DEMO_NOTICE = ("demo model: random weights, so the text is meaningless. "
               "Pass a real model (a local folder or a hub id, e.g. "
               "--model Qwen/Qwen2.5-0.5B-Instruct) for real answers.")

SPECIAL_EOS = 151645  # <|im_end|>
SPECIAL_PAD = 151643  # <|endoftext|>


@dataclass(frozen=True)
class DemoShape:
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    seed: int = 0
    dtype: str = "bfloat16"


def _asset(name: str) -> bytes:
    return resources.files("yun.assets").joinpath(name).read_bytes()


def qwen2_tokenizer_json() -> str:
    return gzip.decompress(_asset("qwen2_tokenizer.json.gz")).decode("utf-8")


def qwen25_chat_template() -> str:
    return _asset("qwen2.5_chat_template.jinja").decode("utf-8")


def write_qwen2_tokenizer(folder: str, max_length: int = 32768) -> None:
    """tokenizer.json + tokenizer_config.json as Qwen2.5-Instruct ships them."""
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(qwen2_tokenizer_json())
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": max_length,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "add_prefix_space": False,
        "chat_template": qwen25_chat_template(),
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def _config(shape: DemoShape) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": shape.dtype,
        "bos_token_id": SPECIAL_PAD,
        "eos_token_id": SPECIAL_EOS,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "yun_demo": {**asdict(shape), "notice": DEMO_NOTICE},
    }


def _weights(shape: DemoShape) -> dict:
    import torch

    g = torch.Generator().manual_seed(shape.seed)
    dt = getattr(torch, shape.dtype)
    E, I, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    D = E // shape.num_attention_heads
    kv = shape.num_key_value_heads * D

    def rnd(*size: int, std: float = 0.02) -> "torch.Tensor":
        return (torch.randn(*size, generator=g) * std).to(dt)

    w = {"model.embed_tokens.weight": rnd(V, E), "model.norm.weight": torch.ones(E, dtype=dt)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": torch.ones(E, dtype=dt),
            p + "post_attention_layernorm.weight": torch.ones(E, dtype=dt),
            p + "self_attn.q_proj.weight": rnd(E, E), p + "self_attn.q_proj.bias": rnd(E),
            p + "self_attn.k_proj.weight": rnd(kv, E), p + "self_attn.k_proj.bias": rnd(kv),
            p + "self_attn.v_proj.weight": rnd(kv, E), p + "self_attn.v_proj.bias": rnd(kv),
            p + "self_attn.o_proj.weight": rnd(E, E),
            p + "mlp.gate_proj.weight": rnd(I, E),
            p + "mlp.up_proj.weight": rnd(I, E),
            p + "mlp.down_proj.weight": rnd(E, I),
        })
    return w


def build_demo_checkpoint(folder: str, shape: DemoShape = DemoShape()) -> str:
    """Write the demo checkpoint into `folder` (atomically); returns the folder."""
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_config(shape), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": SPECIAL_PAD, "eos_token_id": [SPECIAL_EOS, SPECIAL_PAD],
                       "do_sample": False}, f, indent=2)
        write_qwen2_tokenizer(tmp, shape.max_position_embeddings)
        save_file(_weights(shape), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(f"# yun demo checkpoint\n\n{DEMO_NOTICE}\n")
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_demo(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return "yun_demo" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
