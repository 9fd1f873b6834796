"""Structured output over HTTP: response_format and guided_* on both endpoints, with the
openai SDK's `parse()` helper; the tiny random model must still produce valid output."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Describe a pet."}]


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=5)
    verified: bool


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=5)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=20)
    owner: Owner


def test_sdk_parse_with_a_pydantic_model(client):
    for seed in range(3):
        r = client.chat.completions.parse(model=MODEL, messages=CHAT, response_format=Pet,
                                          max_tokens=200, temperature=1.0, seed=seed)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(msg.parsed, Pet) and msg.parsed == Pet.model_validate_json(msg.content)


def test_json_schema_response_format_streams_valid_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "strict": True,
                                                  "schema": Pet.model_json_schema()}}
    full = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=fmt,
                                          max_tokens=200, seed=5)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT,
                                                 response_format=fmt, max_tokens=200, seed=5,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    Pet.model_validate_json(text)


def test_json_object_mode_gives_an_object(client):
    stopped = 0
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60,
                                           response_format={"type": "json_object"}, seed=seed)
        c = r.choices[0]
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(c.message.content), dict)
    assert stopped >= 1


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_guided_regex_choice_grammar_and_json_on_both_endpoints(client, endpoint):
    cases = [({"guided_regex": r"[A-Z]{2}-\d{2}"}, lambda t: re.fullmatch(r"[A-Z]{2}-\d{2}", t)),
             ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
             ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'},
              lambda t: re.fullmatch(r"x\d\d?", t)),
             ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                               "required": ["ok"]}},
              lambda t: json.loads(t)["ok"] in (True, False)),
             ({"response_format": {"type": "json_schema", "json_schema": {
                 "name": "n", "schema": {"type": "integer", "minimum": 1, "maximum": 9}}}},
              lambda t: 1 <= json.loads(t) <= 9)]
    for extra, ok in cases:
        for seed in range(2):
            if endpoint == "chat":
                r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40,
                                                   seed=seed, extra_body=extra)
                text, reason = r.choices[0].message.content, r.choices[0].finish_reason
            else:
                r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40,
                                              seed=seed, extra_body=extra)
                text, reason = r.choices[0].text, r.choices[0].finish_reason
            assert reason == "stop" and ok(text), (extra, text)


def test_every_choice_of_n_follows_the_grammar(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, n=4, seed=1,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert len(r.choices) == 4 and all(c.message.content in ("yes", "no") for c in r.choices)


def test_an_invalid_schema_is_a_400_naming_the_problem(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}
    for stream in (False, True):  # refused before a stream starts
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5,
                                           response_format=fmt, stream=stream)
        err = info.value.body
        assert err["param"] == "response_format" and "invalid JSON schema" in err["message"]
        assert "missing" in err["message"], err
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                  extra_body={"guided_regex": "[z-a]"})
    assert info.value.body["param"] == "guided_regex" and "regex" in info.value.body["message"]
