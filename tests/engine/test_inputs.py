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
