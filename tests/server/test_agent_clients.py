"""Agent-framework clients, unchanged, against /v1/messages: LangChain's ChatAnthropic and
LiteLLM's `anthropic/` provider (skipped when they are not installed)."""

from __future__ import annotations

import json
import os
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

MODEL = "tiny"


class GetWeather(BaseModel):
    """Get the weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Lima"]


def test_langchain_chat_anthropic_invoke_stream_and_tools(server):
    lc = pytest.importorskip("langchain_anthropic")
    llm = lc.ChatAnthropic(model=MODEL, base_url=server.url, api_key="none", max_tokens=40,
                           temperature=0, max_retries=0)
    whole = llm.invoke("Say something.")
    assert isinstance(whole.content, str) and whole.usage_metadata["output_tokens"] > 0
    streamed = "".join(c.text if hasattr(c, "text") and isinstance(c.text, str) else
                       (c.content if isinstance(c.content, str) else "")
                       for c in llm.stream("Say something."))
    assert streamed == whole.content
    tools = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    msg = tools.invoke("What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "GetWeather" and GetWeather.model_validate(call["args"])


def test_litellm_anthropic_provider(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    litellm = pytest.importorskip("litellm")
    kw = dict(model=f"anthropic/{MODEL}", api_base=server.url, api_key="none", max_tokens=8,
              temperature=0, messages=[{"role": "user", "content": "Say something."}])
    r = litellm.completion(**kw)
    text = r.choices[0].message.content or ""
    assert r.usage.completion_tokens > 0
    chunks = list(litellm.completion(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    tools = [{"type": "function", "function": {"name": "GetWeather", "description": "weather",
                                               "parameters": GetWeather.model_json_schema()}}]
    r = litellm.completion(**{**kw, "max_tokens": 40}, tools=tools, tool_choice={
        "type": "function", "function": {"name": "GetWeather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "GetWeather"
    GetWeather.model_validate(json.loads(call.function.arguments))
