"""Test helpers that drive the engine's pieces by hand."""

from __future__ import annotations

import torch

from yun.engine.engine import LLMEngine
from yun.engine.request import Request
from yun.engine.scheduler import ScheduledRequest, SchedulerOutput
from yun.layers.context import ForwardContext, forward_context
from yun.sampling_params import SamplingParams


@torch.inference_mode()
def logits_in_chunks(engine: LLMEngine, token_ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Our logits for every position of `token_ids`, computed in steps of `chunks` tokens
    (a 1-token chunk goes down the decode path). Returns [len(token_ids), V] float32."""
    assert sum(chunks) == len(token_ids)
    req = Request("probe", list(token_ids), SamplingParams(max_tokens=1), max_tokens=1, seed=0)
    runner, kv = engine.runner, engine.kv
    rows, start = [], 0
    try:
        for n in chunks:
            assert kv.allocate(req, n)
            sched = SchedulerOutput([ScheduledRequest(req, n, start)])
            inp = runner.prepare(sched)
            with forward_context(ForwardContext(inp.attn, runner.kv_caches)):
                hidden = runner.model(inp.input_ids, inp.positions)
            rows.append(runner.model.compute_logits(hidden))
            start += n
            req.num_computed_tokens = start
    finally:
        kv.free_request(req)
    return torch.cat(rows)


def reference_model(path: str):
    import transformers

    from yun.config import ModelConfig

    arch = ModelConfig.from_folder(path).architecture
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32)
    return model.eval()
