"""The OpenAI Responses API as the `openai` SDK sees it (responses.create / stream / parse,
retrieve, delete), against a live server over the tiny random Qwen2."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict

from yun.server import ServerSettings, build_app

MODEL = "tiny"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Lima"]}},
               "required": ["city"], "additionalProperties": False}}


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["Paris", "Lima"]
    country: Literal["France", "Peru"]


def items(response) -> list[dict]:
    """Output items without their ids (each response draws new ones)."""
    return [{k: v for k, v in o.model_dump(exclude_none=True).items()
             if k not in ("id", "call_id")} for o in response.output]


def test_create_with_a_string_input(client):
    r = client.responses.create(model=MODEL, input="Say something.", max_output_tokens=8,
                                instructions="Be terse.", temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] in (["message"], [])
    assert r.output_text == "".join(c.text for o in r.output for c in o.content)
    assert 0 < r.usage.output_tokens <= 8 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0


def test_stream_events_reassemble_to_the_whole_response(client):
    kw = dict(model=MODEL, input="Say something.", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == ("response.completed" if whole.status == "completed"
                         else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert items(events[-1].response) == items(whole)
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_text_format_json_schema_with_parse_and_stream(client):
    kw = dict(model=MODEL, input="Describe Paris.", max_output_tokens=60)
    parsed = client.responses.parse(text_format=City, **kw)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, City)
    with client.responses.stream(text_format=City, **kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, City) and "".join(deltas) == final.output_text


def test_function_call_round_trip_and_streamed_arguments(client):
    kw = dict(model=MODEL, input=[{"role": "user", "content": "Weather in Paris?"}],
              tools=[WEATHER], tool_choice="required", max_output_tokens=60,
              extra_body={"seed": 2})
    r = client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Lima")
    events = list(client.responses.create(stream=True, **kw))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == calls[0].arguments or args.startswith(calls[0].arguments)
    assert items(events[-1].response) == items(r)
    named = client.responses.create(**{**kw, "tool_choice": {"type": "function",
                                                             "name": "get_weather"}})
    assert [o.type for o in named.output] == ["function_call"]
    follow = client.responses.create(model=MODEL, max_output_tokens=4, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert follow.usage.input_tokens > r.usage.input_tokens


def test_previous_response_id_continues_and_the_store_gets_and_deletes(client):
    first = client.responses.create(model=MODEL, input="My name is Ana.", max_output_tokens=4)
    second = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4,
                                     previous_response_id=first.id)
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=4)
    # The continued prompt holds the first turn (input and output) before the new input.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and items(got) == items(first)
    assert client.responses.delete(first.id) is None or True  # the SDK returns nothing
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    unstored = client.responses.create(model=MODEL, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_store_is_bounded_least_recently_used_first():
    from yun.server.responses import ResponseStore

    store = ResponseStore(size=2)
    for rid in ("a", "b"):
        store.put({"id": rid}, [])
    store.get("a")  # a is now the most recently used
    store.put({"id": "c"}, [])
    assert list(store.items) == ["a", "c"]


THOUGHT = r"<think>\n[a-z]{2,6}( [a-z]{2,6}){1,3}\.\n</think>\n\n[A-Z][a-z]{1,6}\."


def test_reasoning_item_for_a_thinking_model(engine, start_server):
    live = start_server(build_app(engine, ServerSettings(
        port=0, served_model_name=MODEL, reasoning_parser="think")), engine)
    client = live.client()
    kw = dict(model=MODEL, input="What is 2 + 2?", max_output_tokens=60,
              reasoning={"effort": "low", "summary": "auto"},
              extra_body={"guided_regex": THOUGHT, "seed": 1})
    r = client.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    thought = r.output[0].content[0].text
    assert thought and "think>" not in thought and r.output[0].summary[0].text == thought
    assert r.output_text[0].isupper() and 0 < r.usage.output_tokens_details.reasoning_tokens
    events = list(client.responses.create(stream=True, **kw))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        thought
    assert items(events[-1].response) == items(r)


@pytest.mark.parametrize("body,param", [
    ({"input": []}, None),
    ({"input": 5}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input[0].call_id"),
    ({"input": [{"type": "image", "url": "x"}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "xml"}}}, "text"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
])
def test_bad_requests_are_openai_4xx(server, body, param):
    with server.http() as http:
        r = http.post("/v1/responses", json={"model": MODEL, "input": "hi",
                                             "max_output_tokens": 2, **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert (err["param"] or "").startswith(param), err
