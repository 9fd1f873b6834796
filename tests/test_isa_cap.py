"""YUN_MAX_CPU_ISA: the levels, the features yun then sees, every kernel choice that reads
them, torch's libraries capped alike, and an engine on a capped CPU end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from yun import isa_cap, kernels
from yun.kernels import cpu
from yun.layers.backend import QuantKernels

AVX2 = {"avx2", "fma", "f16c"}
REPORTED = cpu.reported_features()
needs_avx512 = pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= REPORTED,
                                  reason="this CPU has no AVX-512")


def test_levels_are_cumulative_and_unknown_names_are_refused(monkeypatch):
    assert isa_cap.allowed("scalar") == frozenset()
    assert isa_cap.allowed("avx2") == AVX2
    assert isa_cap.allowed("avx512") == AVX2 | {"avx_vnni", "avx512f", "avx512bw", "avx512vl"}
    for lower, higher in zip(isa_cap.LEVELS, isa_cap.LEVELS[1:]):
        assert isa_cap.allowed(lower) < isa_cap.allowed(higher)
    assert isa_cap.allowed("amx") == frozenset(cpu.X86_FLAGS)  # the top level removes nothing
    monkeypatch.setenv(isa_cap.ENV, "avx3")
    with pytest.raises(ValueError, match="YUN_MAX_CPU_ISA='avx3': use one of scalar, avx2"):
        isa_cap.max_isa()
    monkeypatch.setenv(isa_cap.ENV, " AVX2 ")
    assert isa_cap.max_isa() == "avx2"


def test_the_cap_removes_features_above_its_level_only(monkeypatch):
    monkeypatch.delenv(isa_cap.ENV, raising=False)
    assert cpu.cpu_features() == REPORTED
    monkeypatch.setenv(isa_cap.ENV, "avx2")
    assert cpu.cpu_features() == REPORTED & AVX2
    feats = frozenset({"avx2", "fma", "f16c", "avx512f", "amx_bf16"})
    assert isa_cap.cap(feats) == AVX2
    assert isa_cap.cap(frozenset({"neon", "asimddp"}), arm=True) == {"neon", "asimddp"}
    monkeypatch.setenv(isa_cap.ENV, "scalar")
    assert cpu.cpu_features() == frozenset() and cpu.quant_path() == "scalar"
    assert isa_cap.cap(frozenset({"neon"}), arm=True) == frozenset()
    assert kernels.native_isa() is None  # no native build: torch's kernels


@needs_avx512
def test_an_avx2_cap_on_an_avx512_cpu_takes_every_avx2_choice(monkeypatch):
    monkeypatch.setenv(isa_cap.ENV, "avx2")
    assert kernels.native_isa() == "avx2"
    # no AMX / vdpbf16ps GEMM after dequantizing: torch's fp32 one, from AVX2's threshold
    assert kernels.quant_many_rows() is kernels._f32_many_rows
    assert kernels.quant_many_rows_from() == kernels.FP32_MANY_ROWS_FROM["avx2"]
    gemm = kernels.bf16_gemm("avx2")
    assert kernels.bf16_many_rows(gemm) is gemm  # not torch's (oneDNN AMX) bf16 GEMM
    assert "capped: YUN_MAX_CPU_ISA=avx2" in cpu.describe()
    module = kernels.quant()
    if module is not None:
        assert "avx512-vnni" in module.isas()  # the CPU runs it, but yun does not take it
        assert QuantKernels.choose(module).isa == "avx2"
        with pytest.raises(ValueError, match="'avx512' cannot run on this CPU"):
            QuantKernels.choose(module, isa="avx512")
    monkeypatch.setenv(isa_cap.ENV, "avx512")
    if module is not None:
        assert QuantKernels.choose(module).isa == "avx512"


# A prompt of 40 tokens: its prefill takes the many-row path (fp32 GEMM under the cap).
_CHILD = """
import json, sys, torch
from yun import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", quantization="q8_0", num_threads=2,
          native_kernels=sys.argv[2] == "native")
prompt = {"prompt_token_ids": [(7 * i + 3) % 200 for i in range(40)]}
out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))
print(json.dumps({"describe": llm.engine.runner.describe(),
                  "torch": torch.backends.cpu.get_cpu_capability(),
                  "tokens": list(out[0].outputs[0].token_ids)}))
"""


def _engine_in_a_child(path: str, cap: str | None, native: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (isa_cap.ENV, *isa_cap.TORCH_VARS)}
    if cap is not None:
        env[isa_cap.ENV] = cap
    done = subprocess.run([sys.executable, "-c", _CHILD, path, "native" if native else "torch"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_avx512
def test_an_engine_under_an_avx2_cap_runs_the_avx2_kernels_and_torch_at_avx2(qwen2_path):
    if kernels.quant() is None or kernels.native("avx2") is None:
        pytest.skip("no compiler here")
    capped = _engine_in_a_child(qwen2_path, "avx2")
    assert "capped: YUN_MAX_CPU_ISA=avx2" in capped["describe"]
    assert "quantized matmul: avx2/int16, >= 16 rows: fp32" in capped["describe"]
    assert "native build: avx2" in capped["describe"]
    assert capped["torch"] == "AVX2"  # ATen's kernels were capped before torch started
    full = _engine_in_a_child(qwen2_path, None)
    assert "capped" not in full["describe"] and "native build: avx512" in full["describe"]
    assert full["torch"] != "AVX2"
    # The prefill's fp32 GEMM on the exact weights and the decode's int16-activation
    # kernels: the greedy tokens of torch's dequantize-then-float32 path.
    reference = _engine_in_a_child(qwen2_path, None, native=False)
    assert "quantized matmul: torch" in reference["describe"]
    assert capped["tokens"] == reference["tokens"] and len(capped["tokens"]) == 6


def test_an_unknown_level_is_a_clear_error_at_the_first_kernel_choice(qwen2_path):
    env = {**os.environ, isa_cap.ENV: "avx3"}
    code = "import yun; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "imported"  # --help still works
    done = subprocess.run([sys.executable, "-m", "yun", "generate", "--model", qwen2_path, "hi",
                           "--max-tokens", "2"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "yun: error: YUN_MAX_CPU_ISA='avx3': use one of scalar, avx2" in done.stderr
    assert "Traceback" not in done.stderr


def test_importing_yun_leaves_torch_alone_without_a_cap():
    env = {k: v for k, v in os.environ.items() if k != isa_cap.ENV}
    code = ("import os, yun; print(os.environ.get('ONEDNN_MAX_CPU_ISA', '-'), "
            "os.environ.get('ATEN_CPU_CAPABILITY', '-'))")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.split() == ["-", "-"]
    env[isa_cap.ENV] = "avx512_vnni"
    env["ATEN_CPU_CAPABILITY"] = "default"  # a variable already set wins
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.split() == ["AVX512_CORE_VNNI", "default"]
