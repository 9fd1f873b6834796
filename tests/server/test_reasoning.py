"""Reasoning content: `<think>...</think>` split from the answer, for hand-written outputs
of each template style (the model opens the block, or the prompt already did), streamed
in any pieces and not; and over HTTP on servers with the parser on."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from tests.server.conftest import _engine
from yun.server import ServerSettings, build_app
from yun.server.parsing import MessageParser, assemble
from yun.server.reasoning import ThinkParser, resolve_reasoning_parser
from yun.server.tool_parsers import DeepSeekV3ToolParser, HermesToolParser

MODEL = "tiny"
CHAT = [{"role": "user", "content": "What is 2 + 2?"}]

# (prompt ends inside the reasoning, raw output, reasoning, content)
CASES = [
    # Qwen3 / QwQ-style thinking: the model writes both tags.
    (False, "<think>\nTwo and two.\n</think>\n\nIt is 4.", "Two and two.", "It is 4."),
    # R1 distills: the template put "<think>\n" in the prompt; the model only closes it.
    (True, "Two and two.\n</think>\n\nIt is 4.", "Two and two.", "It is 4."),
    (True, "<think>Some models repeat the tag.</think>4", "Some models repeat the tag.", "4"),
    (True, "\n</think>\n\n4", None, "4"),  # an empty thought
    # Cut off while thinking (length): all of it is reasoning.
    (True, "Still thinking about </thi", "Still thinking about </thi", None),
    (False, "<think>Still thinking", "Still thinking", None),
    # A thinking model that answered directly, and thinking switched off in the prompt.
    (False, "It is 4.", None, "It is 4."),
    (False, "  It is <b>4</b>.  ", None, "It is <b>4</b>."),
    (False, "<thin", None, "<thin"),
]


def split_stream(parser: MessageParser, text: str, seed: int) -> list[dict]:
    rng, deltas, i = random.Random(seed), [], 0
    while i < len(text):
        j = i + rng.randint(1, 5)
        deltas += parser.feed(text[i:j])
        i = j
    return deltas + parser.finish()


@pytest.mark.parametrize("inside,raw,reasoning,content", CASES)
def test_reasoning_split_streamed_or_not(inside, raw, reasoning, content):
    whole = MessageParser(ThinkParser(inside)).parse(raw)
    assert (whole.reasoning_content, whole.content) == (reasoning, content)
    for seed in range(20):
        msg = assemble(split_stream(MessageParser(ThinkParser(inside)), raw, seed))
        assert (msg.reasoning_content, msg.content) == (reasoning, content)


@pytest.mark.parametrize("tools,raw", [
    (HermesToolParser, 'Need the weather.</think>\n\n<tool_call>\n{"name": "w", "arguments": '
                       '{"city": "Paris"}}\n</tool_call>'),
    (DeepSeekV3ToolParser, "Need the weather.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                           'function<｜tool▁sep｜>w\n```json\n{"city": "Paris"}\n```'
                           "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
])
def test_reasoning_then_tool_calls(tools, raw):
    for seed in range(10):
        msg = assemble(split_stream(MessageParser(ThinkParser(True), tools()), raw, seed))
        assert msg.reasoning_content == "Need the weather." and msg.content is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in msg.tool_calls] == [("w", {"city": "Paris"})]


def test_the_parser_starts_inside_when_the_prompt_opened_the_block():
    assert ThinkParser.starts_inside("<｜Assistant｜><think>\n")
    assert ThinkParser.starts_inside("<|im_start|>assistant\n<think>")
    assert not ThinkParser.starts_inside("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not ThinkParser.starts_inside("<|im_start|>assistant\n")
    assert resolve_reasoning_parser("auto", "{{ '<think>' }}...{{ '</think>' }}") is ThinkParser
    assert resolve_reasoning_parser("auto", "{{ messages }}") is None
    assert resolve_reasoning_parser("none", "</think>") is None


# ---- over HTTP ---------------------------------------------------------------------------
THOUGHT = r"<think>\n[a-z]{2,6}( [a-z]{2,6}){1,3}\.\n</think>\n\n[A-Z][a-z]{1,6}\."


@pytest.fixture(scope="module")
def thinking(engine, start_server):
    """The default tiny model, served with the reasoning parser on."""
    settings = ServerSettings(port=0, served_model_name=MODEL, reasoning_parser="think")
    return start_server(build_app(engine, settings), engine).client()


def test_reasoning_content_and_usage(thinking):
    for seed in range(3):
        r = thinking.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=60,
                                             seed=seed, extra_body={"guided_regex": THOUGHT})
        msg, usage = r.choices[0].message, r.usage
        assert msg.reasoning_content and "think>" not in msg.reasoning_content
        assert msg.content and msg.content[0].isupper() and msg.content.endswith(".")
        assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
        raw = thinking.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=60, seed=seed,
            extra_body={"guided_regex": THOUGHT, "separate_reasoning": False}).choices[0].message
        assert raw.content.startswith("<think>\n" + msg.reasoning_content)
        assert raw.content.endswith(msg.content) and getattr(raw, "reasoning_content", None) is None


def test_streamed_reasoning_reassembles(thinking):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=60, seed=4,
              extra_body={"guided_regex": THOUGHT})
    full = thinking.chat.completions.create(**kw)
    chunks = list(thinking.chat.completions.create(stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    assert any("reasoning_content" in d for d in deltas)
    msg = assemble(deltas)
    assert (msg.reasoning_content, msg.content) == (full.choices[0].message.reasoning_content,
                                                    full.choices[0].message.content)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == \
        full.usage.completion_tokens_details.reasoning_tokens


@pytest.fixture(scope="module")
def r1_server(qwen2_path, tmp_path_factory, start_server):
    """The tiny model with DeepSeek-R1-Distill's chat template (llama.cpp's copy), whose
    generation prompt ends with "<think>\\n" when thinking is on."""
    folder = str(tmp_path_factory.mktemp("r1"))
    shutil.copytree(qwen2_path, folder, dirs_exist_ok=True)
    template = os.path.join(os.path.dirname(__file__), "..", "data", "templates",
                            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    with open(template, encoding="utf-8") as f:
        cfg["chat_template"] = f.read()
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    eng = _engine(folder)
    yield start_server(build_app(eng, ServerSettings(port=0, served_model_name=MODEL)), eng)
    eng.shutdown()


def test_r1_style_prompt_starts_inside_the_reasoning(r1_server):
    client = r1_server.client()
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, seed=0)
    on = client.chat.completions.create(extra_body={"chat_template_kwargs": {
        "enable_thinking": True}}, **kw)
    msg = on.choices[0].message  # a random model never closes the block: all reasoning
    assert msg.reasoning_content and msg.content is None
    assert on.usage.completion_tokens_details.reasoning_tokens >= on.usage.completion_tokens - 1
    off = client.chat.completions.create(**kw)  # llama.cpp's copy closes the block itself
    assert off.choices[0].message.content
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
