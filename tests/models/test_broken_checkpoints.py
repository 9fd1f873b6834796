"""A broken checkpoint gets a message naming the file and the tensor."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from yun import LLM


@pytest.fixture
def ckpt(qwen2_path, tmp_path) -> str:
    dst = tmp_path / "model"
    shutil.copytree(qwen2_path, dst)
    return str(dst)


def load(path: str) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=2**20)


def weights(path: str) -> str:
    return os.path.join(path, "model.safetensors")


def test_missing_config(ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        load(ckpt)


def test_missing_weights_file(ckpt):
    os.remove(weights(ckpt))
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        load(ckpt)


def test_missing_shard_named_in_index(ckpt):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: missing.*model\.norm\.weight"):
        load(ckpt)


def test_unknown_architecture_lists_supported(ckpt):
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["MysteryForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"'MysteryForCausalLM' is not supported; supported: .*Qwen2ForCausalLM"):
        load(ckpt)


def test_missing_tensor(ckpt):
    t = load_file(weights(ckpt))
    del t["model.layers.1.self_attn.k_proj.weight"]
    save_file(t, weights(ckpt))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load(ckpt)


def test_unexpected_tensor(ckpt):
    t = load_file(weights(ckpt))
    t["model.layers.0.mlp.extra.weight"] = t["model.norm.weight"].clone()
    save_file(t, weights(ckpt))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load(ckpt)


def test_wrong_shape(ckpt):
    t = load_file(weights(ckpt))
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:10].clone()
    save_file(t, weights(ckpt))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(10, 64\), expected \(128, 64\)"):
        load(ckpt)


def test_truncated_file(ckpt):
    path = weights(ckpt)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated"):
        load(ckpt)


def test_garbage_header(ckpt):
    with open(weights(ckpt), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or truncated"):
        load(ckpt)
