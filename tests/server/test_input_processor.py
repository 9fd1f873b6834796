"""One input processor (yun/engine/inputs.py) behind every front end: the server's chat
endpoints, `LLM.chat` and `yun chat` turn the same conversation into the same prompt ids;
a chat request builds its SamplingParams once and compiles its grammar once; a bad field
is still a 400 naming it, in OpenAI's error shape, before any stream starts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from yun.engine.guided import GuidedDecoder
from yun.sampling_params import SamplingParams
from yun.server.chat_pipeline import ChatPipeline
from yun.server.metrics import ServerMetrics
from yun.server.protocol import ChatCompletionRequest
from yun.server.serving import OpenAIServing
from yun.server.settings import ServerSettings

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]  # no parameters: filled in
CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def _server_prompt(engine, messages, tools=None) -> tuple[str, list[int]]:
    """The prompt the chat endpoints would run (ChatPipeline.prepare, in process)."""
    serving = OpenAIServing(engine, ServerSettings(port=0), "tiny", ServerMetrics(engine, "tiny"))
    req = ChatCompletionRequest(model="tiny", messages=messages, tools=tools, max_tokens=4)
    job = asyncio.run(ChatPipeline(serving).prepare(req, "r-1")).job
    return job.prompt_text, job.prompt_ids


def test_server_and_llm_chat_render_a_tool_conversation_to_the_same_ids(engine, offline):
    text, ids = _server_prompt(engine, CONVERSATION, TOOLS)
    assert "Weather for a city." in text and "sunny" in text and '"properties": {}' in text
    out = offline.chat(CONVERSATION, SamplingParams(max_tokens=1), tools=TOOLS)[0]
    assert out.prompt_token_ids == ids and out.prompt == text
    cli_text, cli_ids = offline.engine.inputs.render_chat(CONVERSATION, tools=TOOLS)
    assert (cli_text, cli_ids) == (text, ids)  # what `yun chat` calls for each turn


def test_yun_chat_llm_chat_and_the_server_answer_alike(qwen2_path, engine, offline, client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"}]
    r = subprocess.run([sys.executable, "-m", "yun.cli", "chat", "--model", qwen2_path,
                        "--kv-cache-memory", str(2**20), "--system", "Be brief.",
                        "--temperature", "0", "--max-tokens", "8", "--ignore-eos"],
                       input="Hello there\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cli_reply = r.stdout.split("assistant> ", 1)[1].rsplit("\nyou> ", 1)[0]
    out = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8,
                                                ignore_eos=True))[0]
    assert out.prompt_token_ids == _server_prompt(engine, messages)[1]
    served = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                            max_tokens=8, extra_body={"ignore_eos": True})
    assert cli_reply == out.outputs[0].text == served.choices[0].message.content
    assert served.usage.prompt_tokens == len(out.prompt_token_ids)


@pytest.fixture
def counted(monkeypatch):
    """Counts SamplingParams constructions (each runs __post_init__: a validation) and
    grammar lookups / compilations, anywhere in this process (server, engine thread)."""
    counts = {"params": 0, "lookups": 0, "compiles": 0}
    post_init, compile_, compile_new = (SamplingParams.__post_init__, GuidedDecoder.compile,
                                        GuidedDecoder._compile)

    def params(self):
        counts["params"] += 1
        post_init(self)

    def lookup(self, spec):
        counts["lookups"] += 1
        return compile_(self, spec)

    def compile_grammar(self, spec):
        counts["compiles"] += 1
        return compile_new(self, spec)

    monkeypatch.setattr(SamplingParams, "__post_init__", params)
    monkeypatch.setattr(GuidedDecoder, "compile", lookup)
    monkeypatch.setattr(GuidedDecoder, "_compile", compile_grammar)
    return counts


def _fresh_schema() -> dict:
    key = f"k{uuid.uuid4().hex[:8]}"  # a schema no earlier test compiled
    return {"type": "object", "properties": {key: {"type": "integer"}}, "required": [key],
            "additionalProperties": False}


def _sse(body: str) -> list:
    return [json.loads(ln[6:]) for ln in body.splitlines()
            if ln.startswith("data: ") and ln != "data: [DONE]"]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A number?"}],
                              "logprobs": True, "top_logprobs": 2,
                              "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "A number:", "logprobs": 1}),
])
def test_one_request_builds_its_params_once_and_compiles_its_grammar_once(server, counted,
                                                                         path, body):
    schema = _fresh_schema()
    req = {"model": "tiny", "n": 2, "max_tokens": 24, "seed": 3, "stream": True,
           "response_format": {"type": "json_schema",
                               "json_schema": {"name": "x", "schema": schema}}, **body}
    with server.http() as h:
        r = h.post(path, json=req)
    assert r.status_code == 200, r.text
    events = _sse(r.text)
    assert events and not any("error" in e for e in events)
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1}
    assert counted == {"params": 1, "lookups": 1, "compiles": 1}


def test_a_tool_choice_request_also_builds_once(server, counted):
    req = {"model": "tiny", "messages": [{"role": "user", "content": "Weather?"}],
           "tools": [{"type": "function", "function": {"name": f"f{uuid.uuid4().hex[:6]}",
                                                       "parameters": _fresh_schema()}}],
           "tool_choice": "required", "max_tokens": 40, "seed": 1, "stream": True}
    with server.http() as h:
        r = h.post("/v1/chat/completions", json=req)
    assert r.status_code == 200 and "tool_calls" in r.text
    assert counted == {"params": 1, "lookups": 1, "compiles": 1}


@pytest.mark.parametrize("extra, param, message", [
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    ({"max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be at least 1, got 0"),
    ({"top_logprobs": 3, "logprobs": True, "min_p": 2}, "min_p", "min_p must be in [0, 1]"),
])
def test_a_bad_field_is_a_400_naming_it_before_the_stream_starts(server, extra, param,
                                                                message):
    req = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
           **extra}
    with server.http() as h:
        r = h.post("/v1/chat/completions", json=req)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"].startswith(message), err
