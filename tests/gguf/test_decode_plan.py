"""A decode step's layers in one native call (yun/layers/decode_plan.py): the same tokens
and the same logprobs, bit for bit, as the Python layers, on the real default model
(Q4_1 + a Q8_0 head), on a Qwen2 file (q/k/v bias, a fused QKV of one type) and in each
native build this CPU runs; models the plan does not cover take the Python path."""

from __future__ import annotations

import pytest

from dataclasses import replace

from yun import LLM, SamplingParams, kernels

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]


def _generate(llm: LLM, plan: bool, max_tokens: int = 16) -> list[tuple[list[int], str]]:
    llm.engine.runner.model.use_decode_plan = plan
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                logprobs=2, ignore_eos=True))
    return [(list(o.outputs[0].token_ids), repr(o.outputs[0].logprobs)) for o in outs]


def _plan_of(llm: LLM):
    cached = llm.engine.runner.model.__dict__.get("_decode_plan")
    return None if cached is None else cached[1]


@pytest.fixture(scope="module")
def default_llm(smollm2):
    with LLM(smollm2, num_threads=1, kv_cache_memory=64 * 2**20) as llm:
        yield llm


def test_default_model_decodes_identically_through_the_plan(default_llm):
    with_plan = _generate(default_llm, True)
    plan = _plan_of(default_llm)
    assert plan is not None and plan.num_layers() == 30  # the plan ran, every layer in it
    assert _generate(default_llm, False) == with_plan


def test_batched_decodes_with_different_lengths_match(default_llm):
    """Three sequences of different lengths in one decode batch, continuing past a KV
    block boundary (block 16): the plan's attention reads each one's own blocks."""
    assert _generate(default_llm, True, 40) == _generate(default_llm, False, 40)


@pytest.mark.parametrize("isa", [i for i in kernels.ISAS if kernels.native(i) is not None])
def test_each_native_build_runs_the_plan(default_llm, isa):
    mod = kernels.native(isa)
    runner = default_llm.engine.runner
    before = runner.backend
    runner.backend = replace(before, decode=mod.paged_decode_attention, fused=mod)
    try:
        with_plan = _generate(default_llm, True, 8)
        assert type(_plan_of(default_llm)).__module__ == mod.__name__  # rebuilt for it
        assert _generate(default_llm, False, 8) == with_plan
    finally:
        runner.backend = before


def test_another_engine_in_the_process_does_not_take_the_kernels(default_llm, qwen2_path):
    """A dense model's engine built later has no quantized kernels and changes nothing of
    the default model's: its next steps run on its own backend (and its plan still runs)."""
    want = _generate(default_llm, True, 6)
    mine = default_llm.engine.runner.backend
    with LLM(qwen2_path, num_threads=1, dtype="float32", kv_cache_memory=32 * 2**20) as other:
        other.generate(["hi"], SamplingParams(max_tokens=2, temperature=0.0))
        assert other.engine.runner.backend.quant is None
        assert default_llm.engine.runner.backend is mine and mine.quant is not None
        assert _generate(default_llm, True, 6) == want
        assert _plan_of(default_llm) is not None


def test_qwen2_with_qkv_bias_matches(gguf_models):
    path = gguf_models.gguf("qwen2", "Q8_0")
    with LLM(path, num_threads=1, kv_cache_memory=32 * 2**20) as llm:
        with_plan = _generate(llm, True, 12)
        assert _plan_of(llm) is not None
        assert _generate(llm, False, 12) == with_plan


def test_a_model_with_qk_norms_takes_the_python_path(gguf_models):
    with LLM(gguf_models.gguf("qwen3", "Q8_0"), num_threads=1,
             kv_cache_memory=32 * 2**20) as llm:
        out = _generate(llm, True, 4)
        assert len(out[0][0]) == 4
        assert "_decode_plan" in llm.engine.runner.model.__dict__  # asked, and declined
        assert _plan_of(llm) is None


def test_prefill_steps_never_use_the_plan(default_llm, monkeypatch):
    """A step with a prompt in it runs the Python layers (the plan is decode-only)."""
    from yun.layers import decode_plan

    seen: list[int] = []
    real = decode_plan.run_layers

    def spy(model, layers, x, cos, sin):
        out = real(model, layers, x, cos, sin)
        seen.append(-1 if out is None else x.shape[0])
        return out

    monkeypatch.setattr(decode_plan, "run_layers", spy)
    default_llm.engine.runner.model.use_decode_plan = True
    default_llm.generate(["Hello there"], SamplingParams(max_tokens=3, temperature=0.0))
    assert seen[0] == -1  # the prompt: Python layers
    assert seen[1:] == [1, 1]  # each decode: the plan


def test_bf16_weights_stream_through_the_native_kernel_in_both_paths(gguf_models):
    """A BF16 file's decode: the plan calls the native bf16 GEMV (torch's bf16 matrix-vector
    product streams at a third of its speed), and so does the Python path, through the
    backend's bf16 kernels: the two agree bit for bit, which they would not if one took
    torch's matmul."""
    with LLM(gguf_models.gguf("qwen2", "BF16"), num_threads=1,
             kv_cache_memory=32 * 2**20) as llm:
        runner = llm.engine.runner
        assert str(runner.dtype) == "torch.bfloat16" and runner.backend.bf16 is not None
        with_plan = _generate(llm, True, 12)
        assert _plan_of(llm) is not None
        assert _generate(llm, False, 12) == with_plan


def test_f32_weights_stream_through_the_native_kernel_in_both_paths(gguf_models):
    """An F32 file's decode: both paths call the native fp32 GEMV (torch's streams at ~40%
    of the read bandwidth). Its sum order is not torch's, so bit-equal logprobs say both
    paths took the same kernel."""
    with LLM(gguf_models.gguf("qwen2", "F32"), num_threads=1,
             kv_cache_memory=32 * 2**20) as llm:
        runner = llm.engine.runner
        assert str(runner.dtype) == "torch.float32" and runner.backend.f32 is not None
        with_plan = _generate(llm, True, 12)
        assert _plan_of(llm) is not None
        assert _generate(llm, False, 12) == with_plan


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_float_weights_decode_identically_through_the_plan(qwen2_path, dtype):
    """An HF checkpoint's dense weights (Qwen2: q/k/v bias inside the matmul) run through
    the plan too, float32 and bfloat16 on the native GEMVs, bit for bit the Python
    layers' tokens and logprobs, batch of 3 included."""
    with LLM(qwen2_path, num_threads=1, dtype=dtype, kv_cache_memory=32 * 2**20) as llm:
        with_plan = _generate(llm, True, 12)
        assert _plan_of(llm) is not None
        assert _generate(llm, False, 12) == with_plan
