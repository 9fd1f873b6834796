"""`kv_cache_dtype="int8"` end to end on a tiny model: the cache's bytes per token and
blocks, the start-up line, the native decode kernel and the torch path reading the same
int8 rows alike, greedy batches with every block back, the CLI flag and bad values.
Quality on real text: tests/gguf/test_kv_int8_quality.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import logits_in_chunks
from yun import LLM, SamplingParams

# Tiny Qwen2 (tests/conftest.py): 2 layers x (K, V) x 2 kv heads x 16 dims.
FLOAT32_PER_TOKEN = 2 * 2 * 2 * 16 * 4
INT8_PER_TOKEN = 2 * 2 * 2 * (16 + 4)  # 16 int8 values + a float32 scale per row


def test_int8_cache_takes_its_bytes_per_token_and_holds_more_blocks(qwen2_path, capfd):
    mem = 2**20
    f32 = LLM(qwen2_path, dtype="float32", kv_cache_memory=mem)
    i8 = LLM(qwen2_path, dtype="float32", kv_cache_memory=mem, kv_cache_dtype="int8")
    bf16 = LLM(qwen2_path, dtype="bfloat16", kv_cache_memory=mem)
    assert f32.engine.runner.kv_bytes_per_token() == FLOAT32_PER_TOKEN
    assert i8.engine.runner.kv_bytes_per_token() == INT8_PER_TOKEN
    assert bf16.engine.runner.kv_bytes_per_token() == FLOAT32_PER_TOKEN // 2
    assert i8.engine.kv.num_blocks == mem // (16 * INT8_PER_TOKEN)
    assert f32.engine.kv.num_blocks == mem // (16 * FLOAT32_PER_TOKEN)
    cache = i8.engine.runner.kv_caches[0]
    assert cache.dtype == torch.int8 and cache.shape == (2, i8.engine.kv.num_blocks, 16, 2, 20)
    err = capfd.readouterr().err
    assert (f"KV cache: int8 + float32 scale per token and head, {INT8_PER_TOKEN} bytes per "
            f"token, {i8.engine.kv.num_blocks} blocks of 16") in err
    assert f"KV cache: float32, {FLOAT32_PER_TOKEN} bytes per token" in err


def test_native_and_torch_decode_read_the_int8_cache_alike(qwen2_path):
    from yun import kernels

    if kernels.paged_decode_attention() is None:
        pytest.skip("no native kernel build for this CPU")
    ids = torch.randint(100, 4000, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    chunks = [1, 15, 16] + [1] * 8  # every read goes through the cache
    rows = {}
    for native in (True, False):
        llm = LLM(qwen2_path, dtype="float32", kv_cache_memory=2**20, kv_cache_dtype="int8",
                  native_kernels=native)
        rows[native] = logits_in_chunks(llm.engine, ids, chunks)
    exact = LLM(qwen2_path, dtype="float32", kv_cache_memory=2**20)
    full = logits_in_chunks(exact.engine, ids, chunks)
    assert (rows[True] - rows[False]).abs().max().item() <= 1e-4
    quant_err = (rows[False] - full).abs().max().item()
    assert 0 < quant_err <= 0.05 * full.abs().max().item()  # quantized, but close
    assert (rows[True].argmax(-1) == full.argmax(-1)).float().mean().item() >= 0.9


def test_greedy_batch_on_int8_frees_every_block(qwen2_path):
    llm = LLM(qwen2_path, dtype="float32", kv_cache_memory=2**20, kv_cache_dtype="int8",
              max_num_batched_tokens=24)
    prompts = [{"prompt_token_ids": list(range(1000, 1000 + n))} for n in (5, 40, 70)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 20, 20]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_bad_kv_cache_dtype_is_a_clear_error(qwen2_path):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(qwen2_path, kv_cache_dtype="fp4")


def test_cli_flag_reaches_the_engine(qwen2_path):
    cmd = [sys.executable, "-m", "yun.cli", "generate", "--model", qwen2_path, "--max-tokens",
           "4", "--temperature", "0", "--kv-cache-memory", "1M", "--kv-cache-dtype", "int8", "Hi"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{INT8_PER_TOKEN} bytes per token" in r.stderr
    bad = subprocess.run(cmd[:-2] + ["fp4", "Hi"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--kv-cache-dtype" in bad.stderr
