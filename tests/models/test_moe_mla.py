"""Mixture-of-experts and MLA models against transformers, on tiny random checkpoints:
Qwen2-MoE, Qwen3-MoE, and DeepSeek-V3 in its two attention variants (q_lora_rank set /
null). fp32 logits in all three attention paths, greedy tokens, batch invariance,
preemption, and the size of the MLA cache.

Routing ties: random routers can give near-equal scores, and a near tie could pick
different experts here and in transformers. `adjust_checkpoint` scales the routers up,
and with these seeds and prompts the k-th and (k+1)-th routing scores (and the group
scores) stay at least 1.6e-5 apart for every token of every test, two orders of
magnitude above the ~1e-7 differences between the implementations, so choices agree.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_checkpoint
from tests.helpers import assert_greedy_matches, assert_logits_match, reference_model
from yun import LLM, SamplingParams

DEEPSEEK_COMMON: dict[str, Any] = dict(
    architecture="DeepseekV3ForCausalLM", num_key_value_heads=4, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    moe_intermediate_size=32, tie_word_embeddings=False, num_nextn_predict_layers=1)

ARCHS: dict[str, dict[str, Any]] = {
    # 4 layers, every 2nd sparse (1, 3); softmax top-2, not renormalized; shared expert.
    "qwen2_moe": dict(architecture="Qwen2MoeForCausalLM", num_hidden_layers=4, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2,
                      norm_topk_prob=False, tie_word_embeddings=False, rope_theta=1e6),
    # q/k norm; layer 1 dense via mlp_only_layers; top-3 renormalized.
    "qwen3_moe": dict(architecture="Qwen3MoeForCausalLM", head_dim=32, num_hidden_layers=3,
                      num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
                      tie_word_embeddings=False, rope_theta=1e6),
    # V3 shape: q_lora, YaRN with mscale != mscale_all_dim, interleaved rope, 4 groups
    # of 2 experts, top-3 from the best 2 groups, 1 shared expert, first layer dense.
    "deepseek_v3": dict(DEEPSEEK_COMMON, num_hidden_layers=3, q_lora_rank=32,
                        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                         "factor": 4.0, "original_max_position_embeddings": 128,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                         "mscale_all_dim": 0.8}),
    # Smaller-model shape (Moonlight-like): no q_lora, plain rope not interleaved, 2 groups
    # with top-1 group, 2 shared experts, not renormalized, first two layers dense.
    "deepseek_v3_no_q_lora": dict(DEEPSEEK_COMMON, num_hidden_layers=4, q_lora_rank=None,
                                  num_experts_per_tok=2, n_group=2, topk_group=1,
                                  n_shared_experts=2, first_k_dense_replace=2,
                                  norm_topk_prob=False, routed_scaling_factor=1.5,
                                  rope_interleave=False, rope_theta=10000.0),
}

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def make_llm(path: str, **kwargs: Any) -> LLM:
    # One thread: these models are tiny, and on a shared 2-core machine a second
    # OpenMP thread mostly waits at barriers (5-10x slower when the other core is busy).
    return LLM(path, **{"dtype": "float32", "num_threads": 1, **kwargs})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adjust_checkpoint(folder: str, seed: int = 0) -> None:
    """Make routing decisive and DeepSeek checkpoints look like released ones.

    - Router weights x10: transformers' init (std 0.02) leaves top-k scores ~3e-6 apart,
      close enough for a last-bit difference to flip an expert choice.
    - e_score_correction_bias: transformers initialises it to zeros; random values make
      the bias path count.
    - The multi-token-prediction layer that released DeepSeek-V3 checkpoints carry as
      model.layers.{num_hidden_layers}.* (transformers does not build it).
    """
    path = os.path.join(folder, "model.safetensors")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("mlp.gate.weight"):
            tensors[name] = t * 10
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.randn(t.shape, generator=g) * 0.05
    if cfg["architectures"][0] == "DeepseekV3ForCausalLM":
        E, n = cfg["hidden_size"], cfg["num_hidden_layers"]
        mtp = {"enorm.weight": (E,), "hnorm.weight": (E,), "eh_proj.weight": (E, 2 * E),
               "self_attn.kv_a_proj_with_mqa.weight": (40, E),
               "mlp.experts.0.up_proj.weight": (32, E),
               "mlp.gate.e_score_correction_bias": (8,), "shared_head.norm.weight": (E,)}
        for suffix, shape in mtp.items():
            tensors[f"model.layers.{n}.{suffix}"] = torch.randn(shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def moe_path(tmp_path_factory):
    cache: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in cache:
            folder = str(tmp_path_factory.mktemp(f"ckpt-{kind}"))
            build_checkpoint(folder, ARCHS[kind])
            adjust_checkpoint(folder)
            cache[kind] = folder
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def moe_llm(moe_path):
    cache: dict[str, LLM] = {}

    def make(kind: str) -> LLM:
        if kind not in cache:
            cache[kind] = make_llm(moe_path(kind), kv_cache_memory=8 * 2**20)
        return cache[kind]

    return make


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, moe_path, moe_llm):
    return request.param, moe_llm(request.param), reference_model(moe_path(request.param))


def test_logits_match_transformers_across_blocks_and_paths(pair):
    kind, llm, ref = pair
    assert_logits_match(llm.engine, ref, kind)


def test_greedy_tokens_match_transformers_generate(pair):
    _, llm, ref = pair
    assert_greedy_matches(llm, ref, num_tokens=32)


def prompts(n: int, seed: int, lo: int, hi: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 4000) for _ in range(rng.randint(lo, hi))]}
            for _ in range(n)]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kind", ["qwen2_moe", "deepseek_v3"])
def test_batched_requests_match_each_run_alone(kind, moe_llm):
    llm = moe_llm(kind)
    ps = prompts(8, seed=0, lo=3, hi=90)
    together = tokens(llm.generate(ps, GREEDY))
    alone = [tokens(llm.generate(p, GREEDY))[0] for p in ps]
    assert together == alone


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
def test_preemption_under_a_tiny_kv_budget_loses_nothing(kind, moe_path, moe_llm):
    ps = prompts(10, seed=2, lo=20, hi=60)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    big = tokens(moe_llm(kind).generate(ps, params))
    per_token = moe_llm(kind).engine.runner.kv_bytes_per_token()
    tiny = make_llm(moe_path(kind), kv_cache_memory=20 * 16 * per_token, max_model_len=128)
    assert tiny.engine.kv.num_blocks == 20
    outs = tiny.generate(ps, params)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert tokens(outs) == big
    assert tiny.engine.kv.num_free_blocks == 20


def test_mla_cache_holds_only_latent_and_rope_key(moe_path):
    cfg = json.load(open(os.path.join(moe_path("deepseek_v3"), "config.json")))
    llm = make_llm(moe_path("deepseek_v3"), dtype="bfloat16", kv_cache_memory=2**20)
    runner = llm.engine.runner
    per_layer = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]  # 32 + 8
    assert runner.kv_bytes_per_token() == per_layer * cfg["num_hidden_layers"] * 2
    assert runner.kv_caches[0].shape == (runner.num_blocks, 16, per_layer)
    assert runner.kv_caches[0].dtype == torch.bfloat16
    gate = runner.model.model.layers[1].mlp.gate  # routing stays in float32
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    out = llm.generate({"prompt_token_ids": list(range(1000, 1030))}, GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 16


V3_CONFIG: dict[str, Any] = {  # deepseek-ai/DeepSeek-V3 config.json, the fields we read
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6,
}


def test_v3_cache_is_576_values_per_layer_71x_smaller_than_mha():
    from yun.config import EngineConfig, ModelConfig
    from yun.engine.runner import ModelRunner
    from yun.models.deepseek_v3 import is_moe_layer
    from yun.models.registry import arch_spec, model_class

    cfg = ModelConfig.from_dict(V3_CONFIG)
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, arch_spec(cfg))
    runner = SimpleNamespace(model=model, dtype=torch.bfloat16, model_config=cfg,
                             config=EngineConfig())
    runner.kv_cache_spec = lambda n: ModelRunner.kv_cache_spec(runner, n)
    mla = ModelRunner.kv_bytes_per_token(runner)  # what the runner allocates per token
    assert mla == (512 + 64) * 61 * 2 == 70_272  # 68.6 KiB
    mha = 61 * 128 * ((128 + 64) + 128) * 2  # K (nope + rope) and V for every head
    assert mha == 4_997_120 and round(mha / mla, 1) == 71.1  # 4.77 MiB: 71x more
    print(f"\nDeepSeek-V3 KV cache per token, bf16: MLA {mla} B vs multi-head {mha} B")
    attn = model.model.layers[0].self_attn
    assert attn.scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert [i for i in range(61) if is_moe_layer(V3_CONFIG, i)] == list(range(3, 61))
    assert [i for i in range(6) if is_moe_layer({**V3_CONFIG, "moe_layer_freq": 2}, i)] == [4]


def test_mtp_layer_is_in_the_checkpoint_and_skipped(moe_path, moe_llm):
    names = load_file(os.path.join(moe_path("deepseek_v3"), "model.safetensors")).keys()
    assert "model.layers.3.eh_proj.weight" in names
    assert len(moe_llm("deepseek_v3").engine.runner.model.model.layers) == 3


def test_missing_expert_tensor_is_named(moe_path, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(moe_path("qwen3_moe"), folder)
    path = os.path.join(folder, "model.safetensors")
    t = load_file(path)
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(t, path)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) "
                                         r"'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        make_llm(folder, kv_cache_memory=2**20)


def test_fused_experts_equal_a_per_token_loop():
    from yun.layers.moe import FusedExperts, grouped_topk

    torch.manual_seed(0)
    experts = FusedExperts(6, 16, 8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 16)
    ids = torch.tensor([[0, 2]] * 5 + [[2, 5]] * 6)  # experts 1, 3, 4 get no token
    w = torch.rand(11, 2)
    want = torch.zeros_like(x)
    for t in range(11):
        for j in range(2):
            e = ids[t, j]
            gate, up = (experts.gate_up_proj.weight[e] @ x[t]).chunk(2)
            h = torch.nn.functional.silu(gate) * up
            want[t] += w[t, j] * (experts.down_proj.weight[e] @ h)
    torch.testing.assert_close(experts(x, ids, w), want)
    # Group-limited routing never picks an expert outside the best topk_group groups.
    logits, bias = torch.randn(32, 8), torch.zeros(8)
    bias[:4] = 5.0  # groups 0 and 1 (experts 0-3) always win
    _, chosen = grouped_topk(logits, bias, k=3, n_group=4, topk_group=2, renormalize=True,
                             scale=1.0)
    assert chosen.max().item() < 4


R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '<｜User｜>' + m['content'] }}{% elif m['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


def test_r1_distill_chat_template_opening_think_loads_and_runs(checkpoint_factory, tmp_path):
    """DeepSeek-R1-Distill-Qwen is Qwen2; its template opens <think> in the prompt."""
    folder = str(tmp_path / "r1-distill")
    shutil.copytree(checkpoint_factory("qwen2"), folder)
    tok_path = os.path.join(folder, "tokenizer_config.json")
    tok = json.load(open(tok_path, encoding="utf-8"))
    tok.update(chat_template=R1_TEMPLATE, bos_token="<|endoftext|>")
    json.dump(tok, open(tok_path, "w", encoding="utf-8"), ensure_ascii=False)
    llm = make_llm(folder, kv_cache_memory=2**20)
    out = llm.chat([{"role": "user", "content": "1+1?"}], GREEDY)[0]
    assert out.prompt.endswith("<｜User｜>1+1?<｜Assistant｜><think>\n")
    assert llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False).endswith(
        "<think>\n")
    assert len(out.outputs[0].token_ids) == 16 and out.outputs[0].finish_reason == "length"
