"""The Anthropic Messages API as the official `anthropic` SDK sees it, against a live
server over the tiny random Qwen2 (Qwen2.5 chat template: hermes tool calls)."""

from __future__ import annotations

import json

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")

from yun.server import ServerSettings, build_app  # noqa: E402

MODEL = "tiny"
HI = [{"role": "user", "content": "Say something."}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Lima"]},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}}


def make_client(url: str, api_key: str = "none") -> "anthropic.Anthropic":
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(server):
    return make_client(server.url)


def blocks(message) -> list[dict]:
    """The content blocks, tool_use ids left out (each response draws new ones)."""
    return [{k: v for k, v in b.model_dump(exclude_none=True).items() if k != "id"}
            for b in message.content]


def test_create_has_the_anthropic_shape_and_counts_tokens(claude):
    kw = dict(model=MODEL, max_tokens=8, system="You are terse.", messages=HI)
    m = claude.messages.create(extra_body={"temperature": 0}, **kw)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.model == MODEL and m.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in m.content] in (["text"], [])
    assert 0 < m.usage.output_tokens <= 8
    count = claude.messages.count_tokens(model=MODEL, system="You are terse.", messages=HI)
    assert count.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens > 5
    without_system = claude.messages.count_tokens(model=MODEL, messages=HI).input_tokens
    assert without_system != count.input_tokens


def test_stream_reassembles_to_the_whole_message(claude):
    kw = dict(model=MODEL, max_tokens=12, messages=HI, extra_body={"temperature": 0})
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "message_delta" in types and "content_block_start" in types
    assert blocks(final) == blocks(whole) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_end_the_text_and_are_named(claude):
    kw = dict(model=MODEL, max_tokens=24, messages=HI,
              extra_body={"ignore_eos": True, "seed": 5})
    text = claude.messages.create(**kw).content[0].text
    i = next(i for i in range(len(text) // 3, len(text) - 2)
             if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    stop = text[i:i + 2]
    m = claude.messages.create(stop_sequences=[stop], **kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert text.startswith(m.content[0].text) and stop not in m.content[0].text


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
def test_forced_tool_use_round_trip(claude, choice):
    kw = dict(model=MODEL, max_tokens=200, tools=[WEATHER], tool_choice=choice,
              extra_body={"seed": 1})
    m = claude.messages.create(messages=[{"role": "user", "content": "Weather in Paris?"}], **kw)
    assert m.stop_reason == "tool_use"
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Lima")
    assert 1 <= use.input["days"] <= 7
    with claude.messages.stream(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                **kw) as stream:
        assert blocks(stream.get_final_message()) == blocks(m)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                 for b in m.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"},
                   {"type": "text", "text": "And tomorrow?"}]}]
    follow = claude.messages.create(model=MODEL, max_tokens=4, tools=[WEATHER],
                                    messages=history)
    assert follow.usage.output_tokens > 0
    rendered = claude.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=history)
    assert rendered.input_tokens > claude.messages.count_tokens(
        model=MODEL, messages=history[:1]).input_tokens


def test_output_config_format_gives_json_for_the_schema(claude):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    m = claude.messages.create(model=MODEL, max_tokens=30, messages=HI,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(m.content[0].text)["answer"] in ("yes", "no")


def test_tool_choice_none_does_not_call(claude):
    m = claude.messages.create(model=MODEL, max_tokens=6, tools=[WEATHER], messages=HI,
                               tool_choice={"type": "none"})
    assert all(b.type == "text" for b in m.content) and m.stop_reason != "tool_use"


THOUGHT = r"<think>\n[a-z]{2,6}( [a-z]{2,6}){1,3}\.\n</think>\n\n[A-Z][a-z]{1,6}\."


def test_thinking_blocks_for_a_reasoning_model(engine, start_server):
    live = start_server(build_app(engine, ServerSettings(
        port=0, served_model_name=MODEL, reasoning_parser="think")), engine)
    claude = make_client(live.url)
    kw = dict(model=MODEL, max_tokens=60, messages=HI, thinking={"type": "enabled",
                                                               "budget_tokens": 1024},
              extra_body={"guided_regex": THOUGHT, "seed": 3})
    m = claude.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking and "think>" not in m.content[0].thinking
    assert m.content[1].text[0].isupper() and m.stop_reason == "end_turn"
    with claude.messages.stream(**kw) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        assert blocks(stream.get_final_message()) == blocks(m)
    assert "thinking_delta" in deltas and "text_delta" in deltas


def _anthropic_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]


@pytest.mark.parametrize("body,words", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": None}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result",
                                                 "tool_use_id": "nope", "content": "x"}]}]},
     "tool_use_id"),
    ({"messages": [*HI, {"role": "assistant", "content": "Sure"}]}, "last message"),
    ({"tools": [{"name": "f"}]}, "input_schema"),
    ({"tools": [{"name": "s", "type": "web_search_20250305", "input_schema": {}}]}, "type"),
    ({"tool_choice": {"type": "tool"}, "tools": [WEATHER]}, "name"),
    ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, "nope"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"stop_sequences": "x"}, "stop_sequences"),
])
def test_bad_requests_are_anthropic_400s(server, body, words):
    with server.http() as http:
        r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": HI,
                                            **body})
    err = _anthropic_error(r, 400)
    assert err["type"] == "invalid_request_error" and words in err["message"], err


def test_errors_through_the_sdk(claude, server):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL, max_tokens=0, messages=HI)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=HI)
    with server.http() as http:
        _anthropic_error(http.post("/v1/messages", content=b"{nope"), 400)
        _anthropic_error(http.post("/v1/messages/count_tokens", json={"messages": []}), 400)
        _anthropic_error(http.get("/v1/messages"), 405)


def test_x_api_key_and_bearer_both_work(strict_server, api_key):
    model = strict_server.client(api_key=api_key).models.list().data[0].id
    for client in (make_client(strict_server.url, api_key=api_key),  # x-api-key
                   anthropic.Anthropic(base_url=strict_server.url, auth_token=api_key,
                                       max_retries=0)):  # Authorization: Bearer
        assert client.messages.count_tokens(model=model, messages=HI).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as info:
        make_client(strict_server.url, api_key="wrong").messages.create(
            model="x", max_tokens=1, messages=HI)
    assert info.value.body["error"]["type"] == "authentication_error"
