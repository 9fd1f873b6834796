"""GGUF metadata -> a Hugging Face-shaped config dict, so GGUF files and HF folders share
one `ModelConfig` and one model class per family.

GGUF keys are `{arch}.{name}` (e.g. `llama.embedding_length`); the table below names, per
HF field, the GGUF key that holds it. The values are read with the `gguf` package.
"""

from __future__ import annotations

from typing import Any, Callable

# GGUF `general.architecture` -> HF `architectures[0]` (the families yun implements).
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "deepseek2": "DeepseekV3ForCausalLM",
}

# HF field <- `{arch}.` + GGUF key, for every family.
_COMMON: dict[str, str] = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
}

_MOE: dict[str, str] = {
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
}

_DEEPSEEK: dict[str, str] = {
    "n_routed_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "n_shared_experts": "expert_shared_count",
    "first_k_dense_replace": "leading_dense_block_count",
    "routed_scaling_factor": "expert_weights_scale",
    "norm_topk_prob": "expert_weights_norm",
    "n_group": "expert_group_count",
    "topk_group": "expert_group_used_count",
    "q_lora_rank": "attention.q_lora_rank",
    "kv_lora_rank": "attention.kv_lora_rank",
    "qk_rope_head_dim": "rope.dimension_count",
    "v_head_dim": "attention.value_length_mla",
}

_NUMERIC = ({*_COMMON.values(), *_MOE.values(), *_DEEPSEEK.values()} - {"expert_weights_norm"}) | {
    "vocab_size", "attention.key_length", "attention.key_length_mla", "rope.scaling.factor",
    "rope.scaling.original_context_length", "expert_gating_func", "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow", "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_log_multiplier",
    "attention.sliding_window"}

# llama.cpp's expert gating functions (LLAMA_EXPERT_GATING_FUNC_TYPE).
_GATING_SOFTMAX, _GATING_SIGMOID = 1, 2


class MetadataError(ValueError):
    """Metadata that yun cannot turn into a model config (the message names the key)."""


def hf_config(meta: Callable[[str], Any], n_vocab: int, tensor_names: set[str],
              label: str) -> dict[str, Any]:
    """An HF config.json-shaped dict from GGUF metadata.

    meta(key) returns the field's value or None; n_vocab is the tokenizer's size (when the
    file has no `{arch}.vocab_size`); tensor_names tells tied embeddings apart.
    """
    arch = meta("general.architecture")
    if arch not in ARCHITECTURES:
        raise MetadataError(
            f"{label}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}")

    def get(key: str, required: bool = False) -> Any:
        value = meta(f"{arch}.{key}")
        if value is None and required:
            raise MetadataError(f"{label}: metadata key {arch}.{key} is missing")
        if value is not None and key in _NUMERIC and (
                isinstance(value, (str, bool, list)) or not isinstance(value, (int, float))):
            raise MetadataError(f"{label}: metadata key {arch}.{key} should be a number, "
                                f"got {value!r}")
        return value

    hf: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch,
                          "gguf_architecture": arch}
    table = dict(_COMMON)
    if arch in ("qwen2moe", "qwen3moe"):
        table.update(_MOE)
    if arch == "deepseek2":
        table.update(_DEEPSEEK)
    for field, key in table.items():
        value = get(key, required=field in ("hidden_size", "num_hidden_layers",
                                             "num_attention_heads"))
        if value is not None:
            hf[field] = value
    hf["vocab_size"] = get("vocab_size") or n_vocab
    hf.setdefault("num_key_value_heads", hf["num_attention_heads"])
    hf.setdefault("rope_theta", 10000.0)
    hf.setdefault("rms_norm_eps", 1e-6)
    hf.setdefault("max_position_embeddings", 4096)
    hf["tie_word_embeddings"] = "output.weight" not in tensor_names
    if (key_length := get("attention.key_length")) and arch != "deepseek2":
        hf["head_dim"] = key_length  # Qwen3: head_dim != hidden / heads
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        hf["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if arch == "qwen2moe":
        hf["qkv_bias"] = "blk.0.attn_q.bias" in tensor_names
        hf["norm_topk_prob"] = False
    if arch == "qwen3moe":
        hf["norm_topk_prob"] = True
    if arch in ("qwen2moe", "qwen3moe"):
        hf["decoder_sparse_step"] = 1
        hf["mlp_only_layers"] = [i for i in range(hf["num_hidden_layers"])
                                 if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
        hf.setdefault("moe_intermediate_size", hf.get("intermediate_size"))
    if arch == "deepseek2":
        _deepseek(hf, get, label)
    _sliding_window(hf, get, meta(f"{arch}.attention.sliding_window_pattern"))
    if scaling := _rope_scaling(get, arch):
        hf["rope_scaling"] = scaling
    eos = meta("tokenizer.ggml.eos_token_id")
    eot = meta("tokenizer.ggml.eot_token_id")
    hf["eos_token_id"] = [int(i) for i in dict.fromkeys(x for x in (eos, eot) if x is not None)]
    if (bos := meta("tokenizer.ggml.bos_token_id")) is not None:
        hf["bos_token_id"] = int(bos)
    return hf


def _deepseek(hf: dict[str, Any], get: Callable[..., Any], label: str) -> None:
    gating = get("expert_gating_func")
    if gating is not None and gating != _GATING_SIGMOID and hf.get("n_routed_experts"):
        raise MetadataError(
            f"{label}: deepseek2 with expert gating function {gating} (DeepSeek-V2's softmax "
            "routing) is not supported; yun runs DeepSeek-V3/R1 (sigmoid routing)")
    key_mla = get("attention.key_length_mla", required=True)
    hf["qk_nope_head_dim"] = key_mla - hf["qk_rope_head_dim"]
    hf["num_key_value_heads"] = hf["num_attention_heads"]  # GGUF says 1 (MQA form of MLA)
    hf["head_dim"] = hf["qk_rope_head_dim"]  # as transformers' DeepseekV3Config sets it
    hf["rope_interleave"] = True
    hf["topk_method"] = "noaux_tc"
    hf["scoring_func"] = "sigmoid"
    hf["moe_layer_freq"] = 1
    hf.setdefault("norm_topk_prob", False)
    hf.setdefault("routed_scaling_factor", 1.0)
    hf.setdefault("first_k_dense_replace", 0)
    if not hf.get("q_lora_rank"):
        hf["q_lora_rank"] = None


def _sliding_window(hf: dict[str, Any], get: Callable[..., Any], pattern: Any) -> None:
    """`attention.sliding_window` + its per-layer `sliding_window_pattern` (True = a
    sliding layer) -> use_sliding_window / sliding_window / layer_types. A window with no
    pattern is left out, as llama.cpp runs these families without one."""
    window = get("attention.sliding_window")
    if not window or pattern is None:
        return
    flags = [bool(x) for x in pattern]
    if len(flags) != hf["num_hidden_layers"]:
        return
    hf.update(use_sliding_window=True, sliding_window=int(window),
              layer_types=["sliding_attention" if f else "full_attention" for f in flags])


def _rope_scaling(get: Callable[..., Any], arch: str) -> dict[str, Any] | None:
    """`{arch}.rope.scaling.*` -> transformers' rope_scaling fields (llama.cpp writes
    `linear` and `yarn` here; Llama 3's scaling travels as the rope_freqs tensor)."""
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(get("rope.scaling.factor") or 1.0)
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if (orig := get("rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    if kind == "yarn":
        for ours, key in (("beta_fast", "rope.scaling.yarn_beta_fast"),
                          ("beta_slow", "rope.scaling.yarn_beta_slow"),
                          ("attention_factor", "rope.scaling.yarn_attn_factor")):
            if (v := get(key)) is not None:
                scaling[ours] = float(v)
        if (log_mul := get("rope.scaling.yarn_log_multiplier")) is not None and arch == "deepseek2":
            scaling["mscale_all_dim"] = scaling["mscale"] = float(log_mul) / 0.1
    return scaling
