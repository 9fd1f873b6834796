"""One input check for the engine and the server (yun/engine/inputs.py): a typed error
naming the field, so nobody parses error messages for it."""

from __future__ import annotations

import pytest

from yun.engine.inputs import InvalidParam, check_prompt
from yun.sampling_params import SamplingParams


@pytest.mark.parametrize("ids, params, param, text", [
    ([], SamplingParams(), "prompt", "the prompt is empty"),
    ([1, 1000], SamplingParams(), "prompt", "token id 1000 is out of range"),
    ([-1], SamplingParams(), "prompt", "token id -1 is out of range"),
    ([1], SamplingParams(logit_bias={1000: 1.0}), "logit_bias", "names token id 1000"),
    (list(range(64)), SamplingParams(), "prompt", "context length is 64"),
    (list(range(60)), SamplingParams(max_tokens=5), "max_tokens", "65 tokens, more than"),
])
def test_check_prompt_names_the_field(ids, params, param, text):
    with pytest.raises(InvalidParam, match=text) as e:
        check_prompt(ids, params, vocab_size=1000, max_model_len=64)
    assert e.value.param == param


def test_check_prompt_passes_what_fits():
    check_prompt(list(range(59)), SamplingParams(max_tokens=5), vocab_size=1000,
                 max_model_len=64)


@pytest.mark.parametrize("kw, param", [({"temperature": -1.0}, "temperature"),
                                      ({"top_p": 0.0}, "top_p"), ({"n": 0}, "n"),
                                      ({"logit_bias": {1: 500.0}}, "logit_bias"),
                                      ({"output_kind": "delta"}, "output_kind")])
def test_sampling_params_errors_carry_the_field(kw, param):
    with pytest.raises(InvalidParam) as e:
        SamplingParams(**kw)
    assert e.value.param == param and str(e.value).startswith(param)


def test_the_engine_raises_the_same_typed_errors(qwen2_path):
    from tests.engine.test_fake_runner import ScriptedRunner
    from yun.config import EngineConfig
    from yun.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=qwen2_path, block_size=16), runner=ScriptedRunner(4, [5]))
    assert eng.max_model_len == 64
    with pytest.raises(InvalidParam) as e:
        eng.add_request("a", list(range(60)), SamplingParams(max_tokens=10))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidParam) as e:
        eng.add_request("b", [eng.model_config.vocab_size], SamplingParams())
    assert e.value.param == "prompt"
    assert not eng.has_unfinished()


# ---- the input processor ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted(qwen2_path):
    from tests.engine.test_fake_runner import ScriptedRunner
    from yun.config import EngineConfig
    from yun.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=qwen2_path, block_size=16), runner=ScriptedRunner(4, [5]))


def test_the_engine_takes_params_from_its_input_processor_as_they_are(scripted):
    eng = scripted
    mine = eng.inputs.sampling_params(max_tokens=2)
    assert mine._eos_token_ids == eng.eos_token_ids
    eng.add_request("ours", [1, 2], mine)
    assert eng._parents["ours"].params is mine  # no copy
    theirs = SamplingParams(max_tokens=2)  # a caller's own: copied once, with the EOS ids
    eng.add_request("theirs", [1, 2], theirs)
    got = eng._parents["theirs"].params
    assert got is not theirs and got._eos_token_ids == eng.eos_token_ids
    assert theirs._eos_token_ids == ()  # the caller's object is left alone
    eng.abort("ours")
    eng.abort("theirs")


def test_a_grammar_compiled_once_is_not_looked_up_again(scripted, monkeypatch):
    from yun.engine.guided import GuidedDecoder
    from yun.sampling_params import GuidedDecoding

    eng = scripted
    spec = GuidedDecoding(regex="(ab)+")
    grammar = eng.compile_grammar(spec)

    def no_lookup(self, spec):
        raise AssertionError("the engine looked the grammar up again")

    monkeypatch.setattr(GuidedDecoder, "compile", no_lookup)
    eng.add_request("g", [1, 2], eng.inputs.sampling_params(n=2, max_tokens=4, guided=spec),
                    grammar=grammar)
    children = eng._parents["g"].children
    assert len(children) == 2 and all(c.request.grammar is not None for c in children)
    assert children[0].request.grammar.matcher is not children[1].request.grammar.matcher
    eng.abort("g")
    monkeypatch.undo()
    lookups = []
    real = GuidedDecoder.compile
    monkeypatch.setattr(GuidedDecoder, "compile",
                        lambda self, s: lookups.append(s) or real(self, s))
    eng.add_request("h", [1, 2], eng.inputs.sampling_params(n=3, max_tokens=4, guided=spec))
    assert len(lookups) == 1  # without one: one lookup for all three completions
    eng.abort("h")


class _Tok:
    """A tokenizer stand-in that shows what the template was given."""

    eos_token_id = None

    def __init__(self):
        self.calls: list[tuple[list, bool, dict]] = []

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        self.calls.append((messages, add_generation_prompt, kwargs))
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text, add_special_tokens=True):
        return [len(w) for w in text.split("|")] + ([0] if add_special_tokens else [])


def test_render_chat_normalises_messages_and_tools_and_encodes_without_specials():
    from yun.engine.inputs import render_chat

    tok = _Tok()
    text, ids = render_chat(tok, [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": '{"x": 1}'}}]},
    ], tools=[{"type": "function", "function": {"name": "f", "description": None}}])
    messages, gen, kwargs = tok.calls[0]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "a\nb"
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert gen is True
    assert kwargs["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert text == "system:Be brief.|user:a\nb|assistant:None" and ids == [16, 8, 14]


@pytest.mark.parametrize("kwargs", [{"tools": []}, {"add_generation_prompt": False}])
def test_render_chat_refuses_template_kwargs_that_change_its_contract(kwargs):
    from yun.engine.inputs import render_chat

    with pytest.raises(InvalidParam) as e:
        render_chat(_Tok(), [{"role": "user", "content": "hi"}], template_kwargs=kwargs)
    assert e.value.param == "chat_template_kwargs"
