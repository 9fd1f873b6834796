"""The model files' two contracts (yun/models/spec.py): each registered architecture's
`ArchSpec` is what its config says and the decoder is built from the parts it names; the
loader reads only declared `LoaderHooks` and rejects a model that declares none."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import BASE
from yun.config import ModelConfig
from yun.models.deepseek_v3 import DeepseekMoE, MLAttention
from yun.models.llama import MLP, Attention
from yun.models.loader import load_tensors
from yun.models.qwen_moe import SparseMoeBlock
from yun.models.registry import arch_spec, model_class, supported_architectures
from yun.models.spec import ArchSpec, LoaderHooks

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
DEEPSEEK = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, q_lora_rank=None, num_nextn_predict_layers=1)
CONFIGS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(attention_bias=True, mlp_bias=True),
    "Qwen2ForCausalLM": dict(tie_word_embeddings=True),
    "Qwen3ForCausalLM": dict(head_dim=32),
    "Qwen2MoeForCausalLM": dict(MOE, qkv_bias=False, shared_expert_intermediate_size=32),
    "Qwen3MoeForCausalLM": dict(MOE, decoder_sparse_step=2),
    "DeepseekV3ForCausalLM": DEEPSEEK,
    "BertModel": dict(type_vocab_size=2),
}
SPECS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(qkv_bias=True, mlp_bias=True),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True, tie_word_embeddings=True),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
    "Qwen2MoeForCausalLM": ArchSpec(qkv_bias=False, moe="qwen"),
    "Qwen3MoeForCausalLM": ArchSpec(qk_norm=True, moe="qwen"),
    "DeepseekV3ForCausalLM": ArchSpec(attention="mla", moe="deepseek", mtp_in_checkpoint=True),
    "BertModel": ArchSpec(encoder=True),
}


def config(arch: str) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **CONFIGS[arch], "architectures": [arch]})


def build(arch: str) -> nn.Module:
    cfg = config(arch)
    with torch.device("meta"):
        return model_class(arch)(cfg, arch_spec(cfg))


def test_every_registered_architecture_has_a_spec_here():
    assert sorted(SPECS) == supported_architectures()


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_spec_is_what_the_config_says(arch):
    assert arch_spec(config(arch)) == SPECS[arch]


def test_qwen2_moe_reads_its_qkv_bias_from_the_config():
    cfg = ModelConfig.from_dict({**BASE, **MOE, "architectures": ["Qwen2MoeForCausalLM"]})
    assert arch_spec(cfg).qkv_bias  # released Qwen2-MoE configs leave it out: on


def test_decoders_are_built_from_the_parts_the_spec_names():
    qwen2, qwen3 = build("Qwen2ForCausalLM"), build("Qwen3ForCausalLM")
    assert qwen2.model.layers[0].self_attn.qkv_proj.bias is not None
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight
    assert qwen3.model.layers[0].self_attn.q_norm is not None
    assert qwen3.model.layers[0].self_attn.qkv_proj.bias is None
    qwen3_moe = build("Qwen3MoeForCausalLM")  # decoder_sparse_step 2: layer 1 sparse
    assert [type(l.mlp) for l in qwen3_moe.model.layers] == [MLP, SparseMoeBlock]
    ds = build("DeepseekV3ForCausalLM")  # first_k_dense_replace 1
    assert all(type(l.self_attn) is MLAttention for l in ds.model.layers)
    assert [type(l.mlp) for l in ds.model.layers] == [MLP, DeepseekMoE]
    assert type(ds.model.layers[0]) is type(qwen2.model.layers[0])  # one skeleton
    assert all(type(l.self_attn) is Attention for l in qwen3_moe.model.layers)
    assert ds.kv_cache_shape(3, 16) == (3, 16, 16 + 8)  # latent + rope key
    assert qwen3.kv_cache_shape(3, 16) == (2, 3, 16, 2, 32)


def test_spec_rejects_options_that_do_not_go_together():
    with pytest.raises(ValueError, match="MLA has neither"):
        ArchSpec(attention="mla", qk_norm=True)
    with pytest.raises(ValueError, match="moe must be one of"):
        ArchSpec(moe="mixtral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is an encoder"):
        model_class("LlamaForCausalLM")(config("BertModel"), ArchSpec(encoder=True))


def test_declared_hooks_name_the_checkpoint_layout():
    llama, ds = build("LlamaForCausalLM").loader_hooks(), build("DeepseekV3ForCausalLM").loader_hooks()
    assert llama.stacked["k_proj"] == ("qkv_proj", 1) and "q_proj" not in ds.stacked
    assert ds.skip("model.layers.2.eh_proj.weight")  # the MTP layer (2 layers + 1)
    assert not ds.skip("model.layers.1.mlp.gate.weight") and not llama.skip("model.layers.2.x")
    assert ds.weight_target("model.layers.1.mlp.experts.3.up_proj.weight") == (
        "model.layers.1.mlp.experts.gate_up_proj.weight", (3, 1))
    assert llama.weight_target("model.layers.1.mlp.experts.3.up_proj.weight") is None
    bert = build("BertModel").loader_hooks()
    assert bert.skip("pooler.dense.weight") and bert.weight_target("bert.x.y") == ("x.y", None)


class Undeclared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.stacked = {"a": ("proj", 0)}  # a probe-style attribute: not a declaration


class WrongHooks(Undeclared):
    def loader_hooks(self) -> dict:
        return {"stacked": {}}


def test_loader_rejects_a_model_without_declared_hooks():
    t = [("f.safetensors", "proj.weight", torch.zeros(2, 2))]
    with pytest.raises(TypeError, match="Undeclared declares no loader_hooks"):
        load_tensors(Undeclared(), t, "label")
    with pytest.raises(TypeError, match="returned dict, not LoaderHooks"):
        load_tensors(WrongHooks(), t, "label")


def test_loader_follows_the_declared_hooks():
    class Declared(Undeclared):
        def loader_hooks(self) -> LoaderHooks:
            return LoaderHooks(ignored_suffixes=(".inv_freq",),
                               skip=lambda n: n.startswith("extra."))

    model = Declared()
    load_tensors(model, [("f", "proj.weight", torch.ones(2, 2)), ("f", "proj.bias",
                         torch.ones(2)), ("f", "extra.w", torch.ones(9)),
                         ("f", "rot.inv_freq", torch.ones(3))], "label")
    assert torch.equal(model.proj.weight, torch.ones(2, 2))
