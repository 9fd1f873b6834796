"""The demo checkpoint and the command line, as a newcomer meets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from yun import LLM, SamplingParams
from yun.demo import DEMO_NOTICE, DemoShape, build_demo_checkpoint, is_demo

SMALL = DemoShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory) -> str:
    return build_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "demo"), SMALL)


def test_demo_checkpoint_is_deterministic_and_loads_in_transformers(demo_path, tmp_path):
    import transformers

    again = build_demo_checkpoint(str(tmp_path / "again"), SMALL)
    a = open(os.path.join(demo_path, "model.safetensors"), "rb").read()
    b = open(os.path.join(again, "model.safetensors"), "rb").read()
    assert a == b
    cfg = json.load(open(os.path.join(demo_path, "config.json")))
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"]
    assert is_demo(demo_path)
    tok = transformers.AutoTokenizer.from_pretrained(demo_path)
    assert tok.encode("<|im_start|>user") [0] == 151644
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_path)
    assert model.config.hidden_size == 64


def test_demo_generates_and_stops_at_im_end(demo_path):
    llm = LLM(demo_path, kv_cache_memory=8 * 2**20)
    assert 151645 in llm.engine.eos_token_ids
    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=8, seed=1))
    assert 1 <= len(out[0].outputs[0].token_ids) <= 8


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yun.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_streams_text_and_reports_speed(qwen2_path):
    r = run_cli("generate", "--model", qwen2_path, "--max-tokens", "12", "--temperature", "0",
                "--ignore-eos", "Hello")
    assert r.returncode == 0, r.stderr
    llm_text = LLM(qwen2_path, kv_cache_memory=2**20).generate(
        "Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    assert r.stdout.rstrip("\n") == llm_text
    assert "12 tokens in" in r.stderr


def test_help_explains_every_flag():
    for cmd in ("serve", "generate", "chat"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0
        lines = r.stdout.splitlines()
        flags = [l.split()[0] for l in lines if l.startswith("  --")]
        assert "--kv-cache-memory" in r.stdout and "--max-num-seqs" in r.stdout
        for i, line in enumerate(lines):  # each flag line is followed or ended by help text
            if line.startswith("  --") and len(line.split()) <= 2:
                assert lines[i + 1].startswith(" " * 10), f"{cmd}: {line.strip()} has no help"
        assert flags


def test_bad_model_path_is_a_clear_error():
    r = run_cli("generate", "--model", "/nonexistent/model", "hi")
    assert r.returncode == 2 and "no such model file or folder" in r.stderr


def test_chat_cli_multi_turn(qwen2_path):
    r = subprocess.run([sys.executable, "-m", "yun.cli", "chat", "--model", qwen2_path,
                        "--max-tokens", "5", "--temperature", "0"],
                       input="hello\nand again\n/exit\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


def test_demo_notice_is_plain():
    assert "random weights" in DEMO_NOTICE and "--model" in DEMO_NOTICE
