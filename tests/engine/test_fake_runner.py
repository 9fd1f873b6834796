"""LLMEngine over a scripted runner (the runner seam, yun/engine/executor.py): scheduling,
stop conditions, preemption, aborts, freed blocks and output kinds, with no model run.

The model's config and tokenizer come from the tiny test checkpoint's files; no weights
are loaded and no forward runs. The runner commits, for each sampling request, the next
token of that request's script.
"""

from __future__ import annotations

import torch
import pytest

from yun.config import EngineConfig
from yun.engine.engine import LLMEngine
from yun.engine.executor import Runner
from yun.engine.scheduler import RunnerOutput, SchedulerOutput
from yun.outputs import RequestOutputKind
from yun.sampling_params import SamplingParams

BLOCK = 16


class ScriptedRunner:
    """Commits script[rid][k] as request rid's k-th output token; records every step."""

    def __init__(self, num_blocks: int, default: list[int]):
        self.device = torch.device("cpu")
        self.num_blocks = num_blocks
        self.default = default
        self.scripts: dict[str, list[int]] = {}
        self.steps: list[list[tuple[str, int]]] = []  # per step: (request id, new tokens)
        self.released: list[str] = []

    @property
    def is_encoder(self) -> bool:
        return False

    def allocate_kv_cache(self, memory_bytes: int | None) -> int:
        return self.num_blocks

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.steps.append([(s.request.request_id, s.num_new_tokens) for s in sched.scheduled])
        out = RunnerOutput()
        for s in sched.scheduled:
            if s.samples:
                req = s.request
                script = self.scripts.get(req.request_id, self.default)
                out.sampled[req.request_id] = [script[req.num_output_tokens % len(script)]]
        return out

    def embed(self, sched, pooling) -> list[list[float]]:
        raise AssertionError("not used")

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


@pytest.fixture(scope="module")
def words(qwen2_path) -> list[int]:
    from yun.tokenizer import Tokenizer

    return Tokenizer.load(qwen2_path).encode(" one two three four five six seven eight",
                                             add_special_tokens=False)


def make(qwen2_path, words, num_blocks: int = 64, **config) -> tuple[LLMEngine, ScriptedRunner]:
    runner = ScriptedRunner(num_blocks, words)
    assert isinstance(runner, Runner)
    cfg = EngineConfig(model=qwen2_path, block_size=BLOCK, enable_prefix_caching=False,
                       **config)
    return LLMEngine(cfg, runner=runner), runner


def run(engine: LLMEngine) -> dict[str, object]:
    finals = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert not engine.has_unfinished()
    return finals


def all_free(engine: LLMEngine) -> bool:
    s = engine.kv.stats()
    return s.num_free_blocks == s.num_blocks


def test_chunked_prefill_then_decode_in_one_batch(qwen2_path, words):
    eng, runner = make(qwen2_path, words, max_num_batched_tokens=32, max_num_seqs=4)
    eng.add_request("long", list(range(100, 170)), SamplingParams(max_tokens=3))  # 70 tokens
    eng.add_request("short", list(range(200, 205)), SamplingParams(max_tokens=3))
    finals = run(eng)
    # 70 prompt tokens in chunks of the 32-token budget; the short prompt rides along as
    # soon as there is room, and decodes go one token per request per step.
    assert runner.steps[0] == [("long", 32)]
    assert runner.steps[1] == [("long", 32)]
    assert runner.steps[2] == [("long", 6), ("short", 5)]
    assert runner.steps[3] == [("long", 1), ("short", 1)]
    assert len(runner.steps) == 5
    for rid in ("long", "short"):
        assert finals[rid].outputs[0].token_ids == words[:3]
        assert finals[rid].outputs[0].finish_reason == "length"
    assert all_free(eng) and sorted(runner.released) == ["long", "short"]


def test_stop_token_eos_stop_string_and_length(qwen2_path, words):
    eng, runner = make(qwen2_path, words)
    eos = eng.eos_token_ids[0]
    runner.scripts = {"tok": words, "eos": [words[0], eos, words[1]], "str": words,
                      "ign": [eos]}
    eng.add_request("tok", [1, 2, 3], SamplingParams(max_tokens=8, stop_token_ids=[words[2]]))
    eng.add_request("eos", [1, 2, 3], SamplingParams(max_tokens=8))
    eng.add_request("str", [1, 2, 3], SamplingParams(max_tokens=8, stop=[" four"]))
    eng.add_request("ign", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    f = {rid: out.outputs[0] for rid, out in run(eng).items()}
    assert (f["tok"].finish_reason, f["tok"].stop_reason) == ("stop", words[2])
    assert f["tok"].token_ids == words[:3]
    assert (f["eos"].finish_reason, f["eos"].token_ids) == ("stop", [words[0], eos])
    assert (f["str"].finish_reason, f["str"].stop_reason) == ("stop", " four")
    assert f["str"].text == " one two three"
    assert (f["ign"].finish_reason, f["ign"].token_ids) == ("length", [eos] * 4)
    assert all_free(eng)


def test_preemption_recomputes_and_keeps_outputs(qwen2_path, words):
    # 6 blocks of 16 tokens; two requests of 40 + 30 tokens cannot both stay.
    eng, runner = make(qwen2_path, words, num_blocks=6, max_num_seqs=2)
    eng.add_request("a", list(range(100, 140)), SamplingParams(max_tokens=30))
    eng.add_request("b", list(range(300, 340)), SamplingParams(max_tokens=30))
    finals = run(eng)
    assert eng.scheduler.num_preemptions > 0
    expected = [words[k % len(words)] for k in range(30)]
    for rid in ("a", "b"):
        assert finals[rid].outputs[0].token_ids == expected
    # A preempted request was prefilled again from its first token (prompt + outputs).
    recomputed = [n for step in runner.steps for rid, n in step if n > 1]
    assert len(recomputed) > 2
    assert all_free(eng)


def test_abort_frees_blocks_and_forgets_the_request(qwen2_path, words):
    eng, runner = make(qwen2_path, words)
    eng.add_request("x", list(range(100, 150)), SamplingParams(max_tokens=20))
    eng.add_request("y", list(range(100, 110)), SamplingParams(max_tokens=2, n=2))
    eng.step()
    assert not all_free(eng)
    assert eng.abort("x") and not eng.abort("x")
    assert "x" in runner.released
    finals = run(eng)
    assert set(finals) == {"y"} and len(finals["y"].outputs) == 2
    assert all_free(eng) and eng.num_running == 0 and eng.num_waiting == 0
    assert {"y#0", "y#1"} <= set(runner.released)


def test_output_kinds_delta_adds_up_to_cumulative_and_final_only_sends_one(qwen2_path, words):
    eng, _ = make(qwen2_path, words)
    kinds = {"cum": RequestOutputKind.CUMULATIVE, "delta": RequestOutputKind.DELTA,
             "final": RequestOutputKind.FINAL_ONLY}
    for rid, kind in kinds.items():
        eng.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=6, n=2, logprobs=None,
                                                       stop=[" five"], output_kind=kind))
    seen: dict[str, list] = {rid: [] for rid in kinds}
    while eng.has_unfinished():
        for out in eng.step():
            seen[out.request_id].append(out)
    cum = seen["cum"][-1]
    assert len(seen["final"]) == 1 and seen["final"][0].finished
    assert [c.token_ids for c in seen["final"][0].outputs] == [c.token_ids for c in cum.outputs]
    for i in range(2):
        deltas = [o.outputs[i] for o in seen["delta"]]
        assert "".join(d.text for d in deltas) == cum.outputs[i].text == " one two three four"
        assert sum((d.token_ids for d in deltas), []) == cum.outputs[i].token_ids
        assert [d.finish_reason for d in deltas][-1] == "stop"
        assert all(d.finish_reason is None for d in deltas[:-1])
    # Each cumulative output is the sum of the deltas so far, output by output.
    assert len(seen["delta"]) == len(seen["cum"])
    for k, out in enumerate(seen["cum"]):
        sofar = "".join(o.outputs[0].text for o in seen["delta"][:k + 1])
        assert out.outputs[0].text == sofar
