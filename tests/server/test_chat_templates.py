"""Real chat templates (tests/data/templates, as llama.cpp ships them) with tools: they
render tool definitions, tool calls and tool results from OpenAI-shaped messages; the
parser yun picks for each reads back the calls the template writes; and the reasoning
parser knows whether the generation prompt left the model inside its reasoning."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from yun.server.parsing import MessageParser
from yun.server.prompts import render_chat
from yun.server.protocol import ChatMessage
from yun.server.reasoning import ThinkParser, resolve_reasoning_parser
from yun.server.tool_parsers import (DeepSeekV3ToolParser, HermesToolParser,
                                     resolve_tool_parser)
from yun.tokenizer import Tokenizer

FOLDER = os.path.join(os.path.dirname(__file__), "..", "data", "templates")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city."}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
USER = "What is the weather in Paris?"

# template file -> (tool parser auto picks, reasoning parser on, renders tool definitions)
TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct": (HermesToolParser, False, True),
    "Qwen-Qwen3-0.6B": (HermesToolParser, True, True),
    "Qwen-QwQ-32B": (HermesToolParser, True, True),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (HermesToolParser, False, True),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (DeepSeekV3ToolParser, True, False),
    "deepseek-ai-DeepSeek-V3.1": (DeepSeekV3ToolParser, True, False),
    "meta-llama-Llama-3.1-8B-Instruct": (None, False, True),
}


class Templated:
    """The tiny model's tokenizer with another chat template."""

    def __init__(self, tok: Tokenizer, template: str):
        self.tok, self.chat_template = tok, template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.tok.hf.apply_chat_template(messages, chat_template=self.chat_template,
                                               tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               **kwargs)


@pytest.fixture(scope="module")
def tok(qwen2_path) -> Tokenizer:
    return Tokenizer.from_folder(qwen2_path)


def template(name: str) -> str:
    with open(os.path.join(FOLDER, name + ".jinja"), encoding="utf-8") as f:
        return f.read()


def messages(*dicts: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(d) for d in dicts]


@pytest.mark.parametrize("name", TEMPLATES)
def test_parsers_are_chosen_from_the_template(name):
    tools, thinks, _ = TEMPLATES[name]
    assert resolve_tool_parser("auto", template(name)) is tools
    assert (resolve_reasoning_parser("auto", template(name)) is ThinkParser) == thinks


@pytest.mark.parametrize("name", TEMPLATES)
def test_tools_calls_and_results_render(tok, name):
    t = Templated(tok, template(name))
    convo = messages({"role": "system", "content": "Be brief."}, {"role": "user", "content": USER},
                     {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"})
    text, ids = render_chat(t, convo, True, None, TOOLS)
    assert USER in text and "sunny, 21 C" in text and ids
    assert "Paris" in text.split(USER, 1)[1]  # the call's arguments, after the question
    if TEMPLATES[name][2]:
        assert "Weather for a city." in text  # the tool's definition


@pytest.mark.parametrize("name", [n for n, (tools, _, _) in TEMPLATES.items() if tools])
def test_the_chosen_parser_reads_back_the_calls_the_template_writes(tok, name):
    t = Templated(tok, template(name))
    text, _ = render_chat(t, messages({"role": "user", "content": USER},
                                      {"role": "assistant", "content": None,
                                       "tool_calls": [CALL, {**CALL, "id": "call_2"}]}),
                          False, None, TOOLS)
    turn = text.split(USER, 1)[1]  # the assistant's turn, after its header
    parser = MessageParser(None, resolve_tool_parser("auto", template(name))())
    msg = parser.parse(turn)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})] * 2


@pytest.mark.parametrize("name,kwargs,inside", [
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", {"enable_thinking": True}, True),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", {}, False),  # llama.cpp's copy closes it
    ("Qwen-QwQ-32B", {"enable_thinking": True}, True),
    ("Qwen-Qwen3-0.6B", {}, False),  # Qwen3 writes <think> itself
    ("Qwen-Qwen3-0.6B", {"enable_thinking": False}, False),  # an empty, closed block
    ("deepseek-ai-DeepSeek-V3.1", {"thinking": True}, True),
    ("deepseek-ai-DeepSeek-V3.1", {}, False),
])
def test_reasoning_starts_inside_when_the_generation_prompt_opens_it(tok, name, kwargs, inside):
    t = Templated(tok, template(name))
    text, _ = render_chat(t, messages({"role": "user", "content": USER}), True, kwargs)
    assert ThinkParser.starts_inside(text) == inside, text[-40:]
