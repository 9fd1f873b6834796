"""Kernel choices live in one `Backend` per engine, scoped by `use_backend`: nothing is
installed in a module, so two engines (here: two threads, each in its own backend) never
see each other's kernels, and code outside any engine runs pure torch."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from yun.layers import fused, linear
from yun.layers.backend import TORCH, Backend, current, use_backend


def recording(calls: list[str], name: str):
    def matmul(x, w, b):
        calls.append(name)
        return F.linear(x, w, b)

    return matmul


def test_use_backend_is_scoped_and_nests():
    assert current() is TORCH and current().bf16_name == "torch"
    calls: list[str] = []
    outer = Backend(bf16=(recording(calls, "outer"), recording(calls, "outer")))
    inner = Backend(bf16=(recording(calls, "inner"), recording(calls, "inner")))
    x, w = torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with use_backend(outer):
        linear.linear(x, w)
        with use_backend(inner):
            linear.linear(x, w)
        linear.linear(x, w)
    linear.linear(x, w)  # outside: F.linear, nothing recorded
    assert calls == ["outer", "inner", "outer"]
    assert current() is TORCH


def test_two_engines_on_two_threads_each_run_their_own_kernels():
    """Interleaved calls from two threads, each inside its own backend: every call goes
    to its own thread's kernels (a module global would hand one thread the other's)."""
    calls: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)
    x, w = torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16()

    def engine(name: str) -> None:
        fn = recording(calls[name], name)
        with use_backend(Backend(bf16=(fn, fn))):
            for _ in range(5):
                barrier.wait()  # both threads are inside their backends at once
                linear.linear(x, w)

    threads = [threading.Thread(target=engine, args=(n,)) for n in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert calls == {"a": ["a"] * 5, "b": ["b"] * 5}


def test_fused_ops_come_from_the_current_backend_only():
    class Ops:  # stands in for the extension
        pass

    x = torch.randn(2, 8)
    assert fused.ops_for(x) is None
    ops = Ops()
    with use_backend(Backend(fused=ops)):
        assert fused.ops_for(x) is ops
        assert fused.ops_for(x.half()) is None  # a dtype the kernels do not take
    assert fused.ops_for(x) is None


def test_a_runner_without_native_kernels_runs_on_pure_torch(qwen2_path):
    from yun import LLM, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with LLM(qwen2_path, dtype="float32", kv_cache_memory=4 * 2**20,
             native_kernels=False) as llm:
        assert llm.engine.runner.backend == TORCH
        torch_tokens = llm.generate([{"prompt_token_ids": [5, 900, 33]}], params)
    with LLM(qwen2_path, dtype="float32", kv_cache_memory=4 * 2**20) as llm:
        native_tokens = llm.generate([{"prompt_token_ids": [5, 900, 33]}], params)
    assert current() is TORCH  # neither engine left anything behind
    assert torch_tokens[0].outputs[0].token_ids == native_tokens[0].outputs[0].token_ids


def test_many_row_bf16_matmul_is_torch_on_amx_and_native_elsewhere():
    """On AMX-BF16 CPUs torch's bf16 matmul (oneDNN, AMX tiles) beats the native GEMM that
    widens to fp32; on every other CPU the native one runs (torch's collapses without bf16
    hardware)."""
    import torch.nn.functional as F

    from yun import kernels

    def native(x, w, b):  # stands in for the native GEMM
        return x

    assert kernels.bf16_many_rows(native, frozenset({"avx512f", "amx_bf16"})) is F.linear
    assert kernels.bf16_many_rows(native, frozenset({"avx512f", "avx512_bf16"})) is native
    assert kernels.bf16_many_rows(native, frozenset({"avx2", "fma"})) is native
