"""Sliding-window attention per layer (Qwen2 / Qwen3 configs) against transformers.

A 20-token window on a 70-token prompt, on the layers the config marks: Qwen2 by
`use_sliding_window` + `max_window_layers`, Qwen3 by `layer_types` (once with head_dim
64, the native prefill attention's). Float32 logits within
1e-4 in a fresh prefill, a chunk after a cached prefix and decode steps, on the torch
decode path and the native kernel's; greedy batches; every block back at the end.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_checkpoint
from tests.helpers import ATTENTION_PATHS, logits_in_chunks, reference_model
from yun import LLM, SamplingParams
from yun.config import ModelConfig

TINY = dict(vocab_size=512, eos_token_id=511, bos_token_id=510, num_hidden_layers=3)
CASES = {
    "qwen2-max-window-layers": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True,
                                    rope_theta=1e4, use_sliding_window=True, sliding_window=20,
                                    max_window_layers=1),
    "qwen3-layer-types": dict(architecture="Qwen3ForCausalLM", head_dim=32, rope_theta=1e4,
                              tie_word_embeddings=False, use_sliding_window=True,
                              sliding_window=20,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"]),
    # head_dim 64: prefill and chunks through the native prefill attention kernel
    "qwen3-head-dim-64": dict(architecture="Qwen3ForCausalLM", head_dim=64, rope_theta=1e4,
                              tie_word_embeddings=False, use_sliding_window=True,
                              sliding_window=20, num_attention_heads=4, num_key_value_heads=2,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"]),
}
WINDOWS = {"qwen2-max-window-layers": [None, 20, 20], "qwen3-layer-types": [20, None, 20],
           "qwen3-head-dim-64": [20, None, 20]}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path = build_checkpoint(str(tmp_path_factory.mktemp(request.param)),
                            {**CASES[request.param], **TINY})
    return request.param, path, reference_model(path)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_windows_are_read_per_layer(case):
    name, path, _ = case
    cfg = ModelConfig.from_folder(path)
    assert [cfg.sliding_window(i) for i in range(3)] == WINDOWS[name]
    off = ModelConfig.from_dict({**cfg.hf, "use_sliding_window": False})
    assert [off.sliding_window(i) for i in range(3)] == [None] * 3


@pytest.mark.parametrize("native", [True, False], ids=["native-decode", "torch-decode"])
def test_logits_match_transformers_with_a_window_smaller_than_the_prompt(case, native):
    name, path, ref = case
    from yun import kernels

    if native and kernels.paged_decode_attention() is None:
        pytest.skip("no native kernel build for this CPU")
    llm = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, native_kernels=native)
    assert llm.engine.runner.backend.decode_name == ("native" if native else "torch")
    if native and name == "qwen3-head-dim-64":
        assert hasattr(llm.engine.runner.backend.fused, "prefill_attention")
    ids = _ids(70, 5)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    for chunks in ATTENTION_PATHS:
        diff = (logits_in_chunks(llm.engine, ids, chunks) - expected).abs().max().item()
        assert diff <= 1e-4, f"{name} chunks={chunks} native={native}: max |diff| = {diff}"
    assert [layer.self_attn.window for layer in llm.engine.runner.model.model.layers] \
        == WINDOWS[name]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_greedy_batch_matches_transformers_and_frees_every_block(case):
    name, path, ref = case
    llm = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, max_num_batched_tokens=24)
    prompts = [_ids(n, n) for n in (9, 33, 50)]  # shorter and longer than the window
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            g = ref.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False)
        want = g[0, len(p):].tolist()
        assert len(want) >= 8 and out.outputs[0].token_ids[:len(want)] == want, name
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
