"""Test helpers that drive the engine's pieces by hand."""

from __future__ import annotations

import threading

import httpx
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


# Fresh prefill, a chunk after a cached prefix, and single-token decode steps.
ATTENTION_PATHS = ([70], [40, 29, 1], [16, 16, 1, 1, 36])


def assert_logits_match(engine: LLMEngine, ref, label: str, tol: float = 1e-4) -> None:
    """Our float32 logits equal the reference's on a 70-token prompt (5 blocks of 16),
    whichever attention path computes them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(151000, ref.config.vocab_size), (70,), generator=g).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    for chunks in ATTENTION_PATHS:
        diff = (logits_in_chunks(engine, ids, chunks) - expected).abs().max().item()
        assert diff <= tol, f"{label} chunks={chunks}: max |logit diff| = {diff}"


def assert_greedy_matches(llm, ref, num_tokens: int) -> None:
    """Greedy tokens equal transformers' generate for `num_tokens` tokens."""
    prompt = list(range(1000, 1037))
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True))[0]
    with torch.no_grad():
        g = ref.generate(torch.tensor([prompt]), max_new_tokens=num_tokens,
                         min_new_tokens=num_tokens, do_sample=False)
    assert out.outputs[0].token_ids == g[0, len(prompt):].tolist()
    assert out.outputs[0].finish_reason == "length"


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list[str], threading.Event]:
    """POST a streaming request from a started background thread. Returns the thread, the
    list its SSE `data:` payloads are appended to, and an event set at the first one."""
    events: list[str] = []
    started = threading.Event()

    def run() -> None:
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, events, started
