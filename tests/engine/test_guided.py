"""Guided decoding (xgrammar) in the engine, on a tiny random-weight Qwen2: whatever the
model and the sampling settings, the output is in the language, and ends there."""

from __future__ import annotations

import json
import re
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from yun import LLM, SamplingParams
from yun.engine.guided import GrammarState, apply_grammar_masks
from yun.engine.sampler import Sampler, SamplingRow
from yun.sampling_params import GuidedDecoding

PROMPT = {"prompt_token_ids": [3707, 11, 1246, 525, 498, 30]}
V = 151936


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    email_ok: bool


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)
    owner: Owner  # a $ref into $defs
    nickname: str | None = Field(max_length=4)


PET = GuidedDecoding(json=Pet.model_json_schema())

# Batches of settings: temperature 1.0 alone (many seeds), with every filter and penalty,
# and the extremes. (Separate batches: a top-p row makes the sampler sort every row.)
SETTINGS = [[dict(temperature=1.0)] * 12, [dict(temperature=1.0, top_p=0.3)] * 2,
            [dict(temperature=1.0, top_k=3)] * 2, [dict(temperature=1.0, repetition_penalty=2.0)],
            [dict(temperature=1.0, presence_penalty=2.0, frequency_penalty=-2.0)],
            [dict(temperature=1.0, min_p=0.5), dict(temperature=3.0), dict(temperature=0.0),
             dict(temperature=1.0, min_tokens=40), dict(temperature=1.0, n=3)]]


@pytest.fixture(scope="module")
def llm(qwen2_path):
    return LLM(qwen2_path, dtype="float32", kv_cache_memory=16 * 2**20)


def eos(llm) -> tuple[int, ...]:
    return llm.engine.eos_token_ids


def new_state(llm, spec: GuidedDecoding):
    """A matcher for `spec` as the engine makes one: compiled once, then a state over it."""
    g = llm.engine.guided
    return g.new_state(g.compile(spec), spec.start_after, eos(llm))


def check_stops_at_the_end(llm, c) -> None:
    """Finished by the grammar: its last token is EOS and the text is the whole value."""
    assert c.finish_reason == "stop", c
    assert c.token_ids[-1] in eos(llm), c


@pytest.mark.parametrize("batch", SETTINGS, ids=lambda b: f"{len(b)}x{b[0]}")
def test_json_schema_outputs_always_validate_whatever_the_sampling(llm, batch):
    params = [SamplingParams(max_tokens=300, seed=seed, guided=PET, **settings)
              for seed, settings in enumerate(batch)]
    outs = llm.generate([PROMPT] * len(params), params)
    for out in outs:
        for c in out.outputs:
            check_stops_at_the_end(llm, c)
            Pet.model_validate_json(c.text)
    if len(outs) > 2:
        assert len({o.outputs[0].text for o in outs}) > len(outs) // 2  # not one answer


def test_json_object_outputs_are_objects(llm):
    params = [SamplingParams(max_tokens=100, seed=s, guided=GuidedDecoding(json_object=True))
              for s in range(16)]
    stopped = 0
    for out in llm.generate([PROMPT] * len(params), params):
        c = out.outputs[0]
        if c.finish_reason == "stop":  # free-form strings may run past max_tokens
            stopped += 1
            check_stops_at_the_end(llm, c)
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.text.startswith("{")
    assert stopped >= 2


def test_regex_choice_and_grammar_constraints_hold(llm):
    choices = ["yes", "no", 'a "quoted" \\ one', "ünï\ncode"]
    grammar = 'root ::= greet " " name\ngreet ::= "hi" | "hello"\nname ::= [a-z] [a-z]? [a-z]?'
    specs = [(GuidedDecoding(regex=r"\d{3}-[a-z]{2,5}"),
              lambda t: re.fullmatch(r"\d{3}-[a-z]{2,5}", t)),
             (GuidedDecoding(choice=choices), lambda t: t in choices),
             (GuidedDecoding(grammar=grammar), lambda t: re.fullmatch(r"(hi|hello) [a-z]{1,3}", t))]
    seen_choices = set()
    for spec, ok in specs:
        params = [SamplingParams(max_tokens=50, seed=s, temperature=1.5, guided=spec)
                  for s in range(24)]
        for out in llm.generate([PROMPT] * len(params), params):
            c = out.outputs[0]
            check_stops_at_the_end(llm, c)
            assert ok(c.text), (spec, c.text)
            if spec.choice:
                seen_choices.add(c.text)
    assert len(seen_choices) >= 3


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, seed=3)])
def test_grammar_admitting_every_pick_gives_the_unconstrained_tokens(llm, settings):
    """The mask only removes tokens: when the model's picks are all allowed, greedy and
    seeded draws are unchanged (a regex for any text allows all but special tokens)."""
    prompts = [{"prompt_token_ids": [100 + 37 * i + j for j in range(5)]} for i in range(6)]
    free = llm.generate(prompts, SamplingParams(max_tokens=24, **settings))
    guided = llm.generate(prompts, SamplingParams(max_tokens=24, guided=GuidedDecoding(
        regex=r"[\s\S]*"), **settings))
    compared = 0
    for f, g in zip(free, guided):
        ids = f.outputs[0].token_ids
        state = new_state(llm, GuidedDecoding(regex=r"[\s\S]*"))
        for t in ids:
            state.accept(t)
        if state.broken:
            continue  # a special token or a stray UTF-8 byte: the grammar does not admit it
        assert g.outputs[0].token_ids == ids
        compared += 1
    assert compared >= 2


def test_unguided_rows_are_untouched_by_guided_rows_in_the_batch(llm):
    plain = [SamplingParams(max_tokens=20, seed=s, ignore_eos=True) for s in range(4)]
    alone = llm.generate([PROMPT] * 4, plain)
    mixed = llm.generate([PROMPT] * 8, plain + [SamplingParams(max_tokens=20, seed=s, guided=PET)
                                                for s in range(4)])
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]


def test_preempted_guided_requests_resume_in_their_grammar(qwen2_path, llm):
    prompts = [{"prompt_token_ids": [200 + 11 * i + j for j in range(40)]} for i in range(8)]
    owner = GuidedDecoding(json=Owner.model_json_schema())
    params = [SamplingParams(max_tokens=60, seed=s, guided=owner) for s in range(8)]
    big = llm.generate(prompts, params)
    tiny = LLM(qwen2_path, dtype="float32", kv_cache_memory=12 * 16 * 512, max_model_len=128)
    outs = tiny.generate(prompts, params)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in big]
    for o in outs:
        Owner.model_validate_json(o.outputs[0].text)


def test_min_tokens_yields_to_the_end_of_the_grammar(llm):
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=50, min_tokens=20, guided=
                                                   GuidedDecoding(regex=r"\d{3}")))
    c = out.outputs[0]
    assert re.fullmatch(r"\d{3}", c.text) and c.finish_reason == "stop" and len(c.token_ids) < 20


def test_a_stop_token_id_ends_the_grammar_like_eos(llm):
    stop = llm.tokenizer.hf.convert_tokens_to_ids("<|endoftext|>")
    params = SamplingParams(max_tokens=20, seed=1, stop_token_ids=[stop], ignore_eos=True,
                            guided=GuidedDecoding(choice=["ok"]))
    (out,) = llm.generate([PROMPT], params)
    assert out.outputs[0].text == "ok" and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("spec,problem", [
    (GuidedDecoding(json={"type": "foo"}), "Unsupported type"),
    (GuidedDecoding(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}), "$defs"),
    (GuidedDecoding(regex="[a-"), "regex"),
    (GuidedDecoding(grammar="root ::= "), "grammar"),
])
def test_invalid_grammars_are_refused_when_added(llm, spec, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        llm.engine.add_request("bad", PROMPT["prompt_token_ids"], SamplingParams(guided=spec))
    assert not llm.engine.has_unfinished()


def test_guided_decoding_takes_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecoding()
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecoding(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="non-empty"):
        GuidedDecoding(choice=[])


def test_compiled_grammars_are_cached_by_spec(llm):
    dec = llm.engine.guided
    a = dec.compile(GuidedDecoding(json={"type": "object", "properties": {}}))
    b = dec.compile(GuidedDecoding(json='{"type": "object", "properties": {}}'))
    c = dec.compile(GuidedDecoding(json={"type": "object", "properties": {}}, start_after=(5,)))
    assert a is b is c


def test_start_after_defers_the_constraint(llm):
    state = new_state(llm, GuidedDecoding(choice=["ok"], start_after=(7, 8)))
    assert not state.active
    for t in (1, 7, 9, 7):  # anything goes until 7, 8 has been generated
        state.accept(t)
    assert not state.active
    state.accept(8)
    assert state.active and not state.terminated
    for t in llm.tokenizer.encode("ok") + [eos(llm)[0]]:
        state.accept(t)
    assert state.terminated and not state.broken


def test_a_constraint_can_start_after_given_tokens(llm):
    """As after a thinking model's `</think>`: free until then, constrained after."""
    (free,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))
    first = free.outputs[0].token_ids[0]
    spec = GuidedDecoding(choice=["ok"], start_after=(first,))
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, guided=spec))
    c = out.outputs[0]
    assert c.token_ids[0] == first and llm.tokenizer.decode(c.token_ids[1:]) == "ok"
    check_stops_at_the_end(llm, c)


# ---- the sampler's mask, with hand-made grammars ---------------------------------------------
class FakeMatcher:
    """Allows `allowed` (None: everything); what GrammarMatcher offers the sampler."""

    def __init__(self, allowed=None, stops=(0,)):
        self.allowed, self.stop_token_ids = allowed, list(stops)

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        if self.allowed is None:
            bitmask[index] = -1
            return
        words = np.zeros(bitmask.shape[1], dtype=np.uint32)
        for t in self.allowed:
            words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
        bitmask[index] = torch.from_numpy(words.view(np.int32))


class LoopBatch:
    def batch_fill_next_token_bitmask(self, matchers, bitmask, indices) -> None:
        for m, i in zip(matchers, indices):
            m.fill_next_token_bitmask(bitmask, i)


@pytest.fixture
def fake_batch(monkeypatch):
    """xgrammar's batch filler takes only real matchers: fill the fakes one by one."""
    import yun.engine.guided as guided

    monkeypatch.setattr(guided, "_batch_matcher", LoopBatch)


def rows_for(seed_base: int, grammars, **params) -> list[SamplingRow]:
    out = []
    for i, g in enumerate(grammars):
        p = SamplingParams(**params)
        gen = None if p.greedy else torch.Generator().manual_seed(seed_base + i)
        out.append(SamplingRow(p, gen, [1, 2], [3], None if g is None else GrammarState(g)))
    return out


def test_sampler_with_an_all_allowing_mask_draws_the_same_tokens(fake_batch):
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    for params in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9,
                                                                       top_k=50)):
        plain, _ = Sampler()(logits.clone(), rows_for(0, [None] * 6, **params))
        masked, _ = Sampler()(logits.clone(), rows_for(0, [FakeMatcher()] * 6, **params))
        assert plain == masked


def test_sampler_picks_only_allowed_tokens_and_leaves_other_rows_alone(fake_batch):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    allowed = {5, 77, 900}
    for seed in range(30):
        grammars = [FakeMatcher(allowed), None, FakeMatcher(allowed), None]
        toks, _ = Sampler()(logits.clone(), rows_for(seed, grammars, temperature=2.0))
        free, _ = Sampler()(logits.clone(), rows_for(seed, [None] * 4, temperature=2.0))
        assert toks[0] in allowed and toks[2] in allowed
        assert (toks[1], toks[3]) == (free[1], free[3])
    greedy, _ = Sampler()(logits.clone(), rows_for(0, [FakeMatcher(allowed)], temperature=0.0))
    assert greedy[0] == max(allowed, key=lambda t: float(logits[0, t]))


def test_min_tokens_never_leaves_a_guided_row_without_a_token():
    logits = torch.randn(1, 1000)
    rows = rows_for(0, [FakeMatcher(allowed={0}, stops=(0,))], temperature=1.0, min_tokens=5)
    rows[0].params._eos_token_ids = (0,)
    toks, _ = Sampler()(logits, rows)
    assert toks == [0]


def test_rows_without_a_grammar_never_load_the_mask_path(monkeypatch):
    import yun.engine.guided as guided

    monkeypatch.setattr(guided, "apply_grammar_masks", None)  # would fail if called
    toks, _ = Sampler()(torch.randn(3, 100), rows_for(0, [None] * 3, temperature=1.0))
    assert len(toks) == 3
    assert callable(apply_grammar_masks)
