"""Tool calling over HTTP with the tiny random Qwen2 (Qwen2.5 chat template, so the hermes
parser): forced calls (required / named) are valid for the tool's schema; calls the
model writes itself (here steered with a regex) are parsed; streams reassemble to the
non-streamed message; the openai SDK and LangChain work unchanged."""

from __future__ import annotations

import json
import pathlib
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from yun.server import ServerSettings, build_app
from yun.server.parsing import MessageParser, assemble

MODEL = "tiny"
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    """Get the weather forecast for a city."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Tokyo", "Lima"]
    days: int = Field(ge=1, le=7)


class Convert(BaseModel):
    """Convert an amount between currencies."""

    model_config = ConfigDict(extra="forbid")
    amount: int = Field(ge=0, le=1000)
    to: Literal["EUR", "USD"]


def tool(model: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": model.__name__,
                                             "description": model.__doc__,
                                             "parameters": model.model_json_schema()}}


TOOLS = [tool(GetWeather), tool(Convert)]
MODELS = {"GetWeather": GetWeather, "Convert": Convert}
# Hermes-format calls, steered with a regex since a random model never writes them itself.
TWO_CALLS = (r'Sure\.\n<tool_call>\n\{"name": "GetWeather", "arguments": \{"city": "(Paris|Lima)", '
             r'"days": [1-7]\}\}\n</tool_call>\n<tool_call>\n\{"name": "Convert", "arguments": '
             r'\{"amount": [1-9][0-9]?, "to": "EUR"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    """The session's tiny Qwen2 with a 1024-token context: the small test vocabulary spends
    ~490 tokens on the two tools' system prompt (1.4x the real vocabulary's), and 512 would
    leave the calls no room."""
    from tests.server.conftest import _engine

    eng = _engine(checkpoint_factory("qwen2", max_position_embeddings=1024))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    from tests.server.conftest import LiveServer

    live = LiveServer(build_app(engine, ServerSettings(port=0, served_model_name=MODEL)),
                      engine).start()
    yield live
    live.stop()


def calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def streamed(client, **kw) -> tuple[list, dict]:
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and
               c.choices[0].finish_reason]
    return reasons, assemble(deltas)


def test_tool_choice_required_calls_valid_tools(client):
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, seed=seed,
                                           tool_choice="required", max_tokens=140)
        choice = r.choices[0]
        assert choice.message.content is None
        made = choice.message.tool_calls
        if choice.finish_reason == "length":  # a random model may list calls until the end
            made = made[:-1]
        for c in made:
            MODELS[c.function.name].model_validate_json(c.function.arguments)
        assert all(c.id.startswith("call_") and c.type == "function"
                   for c in choice.message.tool_calls)
        one = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, seed=seed,
                                             tool_choice="required", max_tokens=100,
                                             parallel_tool_calls=False).choices[0]
        assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1
        MODELS[one.message.tool_calls[0].function.name].model_validate_json(
            one.message.tool_calls[0].function.arguments)


def test_a_named_tool_choice_calls_that_tool(client):
    named = {"type": "function", "function": {"name": "Convert"}}
    r = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, seed=3,
                                       tool_choice=named, max_tokens=60)
    ((name, args),) = calls(r.choices[0].message)
    assert name == "Convert" and Convert.model_validate(args)
    assert r.choices[0].finish_reason == "stop"  # as OpenAI: a forced call "stop"s


def test_parallel_tool_calls_false_gives_one_call(client):
    for extra in ({"tool_choice": "required"}, {"extra_body": {"guided_regex": TWO_CALLS}}):
        r = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, seed=2,
                                           parallel_tool_calls=False, max_tokens=120, **extra)
        assert len(r.choices[0].message.tool_calls) == 1


def test_calls_the_model_writes_are_parsed_and_the_stream_reassembles(client):
    kw = dict(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=200,
              extra_body={"guided_regex": TWO_CALLS})
    for seed in range(3):
        full = client.chat.completions.create(seed=seed, **kw).choices[0]
        assert full.finish_reason == "tool_calls" and full.message.content == "Sure."
        assert [n for n, _ in calls(full.message)] == ["GetWeather", "Convert"]
        reasons, msg = streamed(client, seed=seed, **kw)
        assert reasons == ["tool_calls"] and msg.content == "Sure."
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg.tool_calls] == \
            [(c.function.name, c.function.arguments) for c in full.message.tool_calls]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "GetWeather"}}])
def test_forced_calls_stream_id_and_name_first_then_argument_pieces(client, tool_choice):
    kw = dict(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice=tool_choice, max_tokens=80,
              seed=11)
    full = client.chat.completions.create(**kw).choices[0].message
    chunks = list(client.chat.completions.create(stream=True, **kw))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    first = {}
    for tc in pieces:
        if tc.index not in first:
            first[tc.index] = tc
            assert tc.id and tc.type == "function" and tc.function.name
        else:
            assert tc.id is None and tc.function.name is None
    assert len(pieces) > len(first)  # the arguments came in several pieces
    _, msg = streamed(client, **kw)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in full.tool_calls]


def test_sdk_parse_with_pydantic_function_tools(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=CHAT, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", parallel_tool_calls=False, max_tokens=80, seed=4)
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_a_conversation_with_tool_results_continues(client):
    messages = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "GetWeather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       max_tokens=5, seed=0)
    assert r.choices[0].message.content is not None


def test_langchain_bind_tools_round_trip(server):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", max_tokens=80,
                     temperature=1.0, seed=7, max_retries=0)
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    ai = forced.invoke([HumanMessage("Weather in Lima?")])
    (call,) = ai.tool_calls
    assert call["name"] == "GetWeather" and GetWeather.model_validate(call["args"])
    chunks = list(forced.stream([HumanMessage("Weather in Lima?")]))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [tc["name"] for tc in merged.tool_calls] == ["GetWeather"]
    history = [HumanMessage("Weather in Lima?"), ai,
               ToolMessage("cloudy", tool_call_id=call["id"])]
    answer = llm.bind_tools([GetWeather]).invoke(history)
    assert isinstance(answer.content, str) and not answer.tool_calls


def test_auto_tools_need_a_known_format(engine, start_server):
    live = start_server(build_app(engine, ServerSettings(port=0, served_model_name=MODEL,
                                                         tool_call_parser="none")), engine)
    client = live.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=2)
    assert info.value.body["param"] == "tools" and "--tool-call-parser" in \
        info.value.body["message"]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=60,
                                       tool_choice="required", seed=1)
    assert r.choices[0].message.tool_calls  # forced calls need no parser


def test_special_token_tags_are_kept_and_the_eos_text_dropped(qwen2_path, tmp_path):
    """Where `<tool_call>` is a special token (Hermes-2-Pro's tokenizer), text that skips
    special tokens would lose the tags: such requests keep them, and the EOS text that then
    ends the output is not content."""
    from types import SimpleNamespace

    from yun.demo import qwen2_tokenizer_json
    from yun.server.chat_pipeline import ChatPipeline
    from yun.server.tool_parsers import HermesToolParser
    from yun.tokenizer import Tokenizer

    for name in ("tokenizer_config.json", "config.json"):
        (tmp_path / name).write_text((pathlib.Path(qwen2_path) / name).read_text())
    spec = json.loads(qwen2_tokenizer_json())
    for t in spec["added_tokens"]:
        t["special"] = t["special"] or "tool_call" in t["content"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_folder(str(tmp_path))
    serving = SimpleNamespace(tokenizer=tok, settings=ServerSettings(),
                              engine=SimpleNamespace(model_config=SimpleNamespace(
                                  eos_token_ids=(151645,))))
    chat = ChatPipeline(serving)
    assert chat.special_tools and not chat.special_reasoning and "<|im_end|>" in chat.eos_texts
    plain = ChatPipeline(SimpleNamespace(
        tokenizer=Tokenizer.from_folder(qwen2_path), settings=ServerSettings(),
        engine=serving.engine))
    assert not plain.special_tools
    raw = 'a <|im_end|> b\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    for cut in range(1, len(raw)):
        parser = MessageParser(None, HermesToolParser(), drop_end=chat.eos_texts)
        msg = assemble(parser.feed(raw[:cut]) + parser.feed(raw[cut:]) + parser.finish())
        assert msg.content == "a <|im_end|> b" and len(msg.tool_calls) == 1
