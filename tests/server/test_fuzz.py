"""Property: whatever the body, the server answers without a 5xx and stays healthy."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "tiny"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 0.5, 1e-300, 1e300, 5e-324, -0.0, 2.0, 100.0]),
    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
token_ids = st.lists(st.integers(-5, 200_000), min_size=0, max_size=12)
text_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]),
                                   "text": st.text(max_size=20)})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
     "content": st.one_of(st.text(max_size=30), st.lists(text_part, min_size=1, max_size=2))},
    optional={"name": st.text(max_size=5)})

# Per field: values a client would plausibly send. Bodies are built from these, then 0-2
# fields are replaced by arbitrary JSON, so most requests reach the engine.
COMMON = {
    "model": st.just(MODEL),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stop_token_ids": st.lists(st.integers(0, 151_000), max_size=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
    "user": st.text(max_size=5), "parallel_tool_calls": st.booleans(), "store": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    "service_tier": st.sampled_from(["auto", "default"]),
    "guided_regex": st.sampled_from([r"\d+", "[a-z]{1,3}", "(", "a|b", ".*"]),
    "guided_choice": st.lists(st.text(max_size=4), max_size=3),
    "guided_json": st.sampled_from([{"type": "object"}, {"type": "string"}, {"type": "nope"},
                                    "{", {"type": "array", "items": {"type": "integer"}}]),
}
CHAT = {**COMMON, "messages": st.lists(message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 3), "max_completion_tokens": st.integers(1, 3),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
        "tools": st.just([{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {
                "x": {"type": "integer"}}, "required": ["x"]}}}]),
        "tool_choice": st.sampled_from(["none", "auto", "required",
                                        {"type": "function", "function": {"name": "f"}}]),
        "separate_reasoning": st.booleans(),
        "response_format": st.sampled_from([
            {"type": "text"}, {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {
                "type": "object", "properties": {"a": {"type": "string"}}}}}])}
COMPLETIONS = {**COMMON, "max_tokens": st.integers(0, 3),
               "prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10),
                                                                  min_size=1, max_size=3),
                                   token_ids, st.lists(token_ids, min_size=1, max_size=3)),
               "logprobs": st.integers(0, 5), "echo": st.booleans()}
# Anthropic Messages and OpenAI Responses bodies (issue 15).
block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.sampled_from(["t1", "t2", ""]),
                           "name": st.sampled_from(["f", ""]),
                           "input": st.dictionaries(st.text(max_size=3), scalars, max_size=2)}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.sampled_from(
        ["t1", "t2", "x"]), "content": st.one_of(st.text(max_size=10), st.none())}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "thinking", "document"])}))
a_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "user", "system"]),
     "content": st.one_of(st.text(max_size=30), st.lists(block, min_size=1, max_size=3))})
A_TOOL = {"name": "f", "input_schema": {"type": "object", "properties": {
    "x": {"type": "integer"}}, "required": ["x"]}}
MESSAGES = {
    "model": st.just(MODEL), "max_tokens": st.integers(-1, 3),
    "messages": st.lists(a_message, min_size=1, max_size=3),
    "system": st.one_of(st.text(max_size=10), st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)),
    "temperature": st.floats(0, 1), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "stop_sequences": st.lists(st.text(max_size=3), max_size=3), "stream": st.booleans(),
    "tools": st.just([A_TOOL]),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                    {"type": "tool", "name": "f"}, {"type": "tool"}]),
    "thinking": st.sampled_from([{"type": "enabled", "budget_tokens": 1024},
                                 {"type": "disabled"}]),
    "output_config": st.just({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
    "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
}
r_item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                           "content": st.one_of(st.text(max_size=20), st.lists(
                               st.fixed_dictionaries({"type": st.sampled_from(
                                   ["input_text", "output_text", "input_image"]),
                                   "text": st.text(max_size=10)}), max_size=2))}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.sampled_from(
        ["c1", ""]), "name": st.just("f"), "arguments": st.sampled_from(['{"x": 1}', "{", ""])}),
    st.fixed_dictionaries({"type": st.just("function_call_output"),
                           "call_id": st.sampled_from(["c1", "c2"]),
                           "output": st.text(max_size=5)}),
    st.fixed_dictionaries({"type": st.sampled_from(["reasoning", "web_search_call"])}))
RESPONSES = {
    "model": st.just(MODEL), "max_output_tokens": st.integers(0, 3),
    "input": st.one_of(st.text(max_size=30), st.lists(r_item, min_size=0, max_size=3)),
    "instructions": st.text(max_size=10), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "stream": st.booleans(), "store": st.booleans(),
    "tools": st.just([{"type": "function", "name": "f", "parameters": A_TOOL["input_schema"]}]),
    "tool_choice": st.sampled_from(["none", "auto", "required",
                                    {"type": "function", "name": "f"}]),
    "text": st.sampled_from([{"format": {"type": "text"}}, {"format": {"type": "json_object"}},
                             {"format": {"type": "json_schema", "name": "a",
                                         "schema": {"type": "object"}}}]),
    "reasoning": st.sampled_from([{"effort": "low"}, {"summary": "auto"}, {"effort": "none"}]),
    "previous_response_id": st.sampled_from(["resp_nope", ""]),
    "parallel_tool_calls": st.booleans(),
}
EMBEDDINGS = {"model": st.just(MODEL), "input": COMPLETIONS["prompt"],
              "encoding_format": st.sampled_from(["float", "base64", "int8"]),
              "dimensions": st.integers(-1, 100)}
EXTRA_KEYS = ["tools", "logit_bias", "best_of", "suffix", "response_format", "unknown",
              "tool_choice", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
              "structured_outputs", "reasoning_effort", "thinking", "output_config"]


def _bodies(fields: dict, required: str) -> st.SearchStrategy:
    @st.composite
    def build(draw) -> dict:
        keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=8))
        body = {k: draw(fields[k]) for k in {required, *keys}}
        for k in draw(st.lists(st.sampled_from(sorted(fields) + EXTRA_KEYS), unique=True,
                               max_size=2)):
            body[k] = draw(values)
        return _short(body)

    return build()


def _short(body: dict) -> dict:
    """Keep generation short: a valid long max_tokens would only make the test slow."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 3 < v < 600:
            body[key] = 3
    if not {"max_tokens", "max_completion_tokens", "max_output_tokens"} & set(body):
        body["max_tokens" if "input" not in body else "max_output_tokens"] = 2
    return body


requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _bodies(CHAT, "messages")),
    st.tuples(st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]),
              _bodies(MESSAGES, "messages")),
    st.tuples(st.just("/v1/responses"), _bodies(RESPONSES, "input")),
    st.tuples(st.just("/v1/embeddings"), _bodies(EMBEDDINGS, "input")),
    st.tuples(st.sampled_from(["/v1/messages", "/v1/responses", "/v1/embeddings"]), values),
    st.tuples(st.just("/v1/completions"), _bodies(COMPLETIONS, "prompt")),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize",
                               "/detokenize"]), values),
    st.tuples(st.sampled_from(["/tokenize", "/detokenize"]),
              st.fixed_dictionaries({}, optional={"prompt": values, "messages": values,
                                                  "tokens": st.one_of(token_ids, values),
                                                  "add_special_tokens": values})),
)


@pytest.fixture(scope="module")
def http(server):
    with server.http() as client:
        yield client


@settings(max_examples=160, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request_=requests)
def test_no_request_body_gets_a_5xx(http, engine, request_):
    path, body = request_
    raw = json.dumps(body).encode()  # NaN and Infinity included, as Python writes them
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text, body)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        for bad in ("server_error", "service_unavailable", '"api_error"', "overloaded_error"):
            assert bad not in r.text, r.text
    assert engine.is_alive


def test_server_is_healthy_after_the_fuzz(http, engine):
    assert http.get("/health").status_code == 200
    assert engine.is_alive


@pytest.mark.parametrize("extra", [
    {"temperature": 1e-300}, {"temperature": 1e-5}, {"temperature": 100.0, "min_tokens": 2},
    {"temperature": 1e300}, {"repetition_penalty": 0.01}, {"repetition_penalty": 100.0},
    {"top_p": 1e-300}, {"min_p": 1.0}, {"top_k": 2**62}, {"seed": -(2**63), "n": 3},
    {"seed": 2**63 - 1, "n": 3}, {"presence_penalty": -2, "frequency_penalty": -2},
    {"stop_token_ids": [0, 151935], "min_tokens": 3}, {"stop": ["", "a" * 200]},
    {"logprobs": 20, "echo": True, "max_tokens": 0}, {"n": 128, "max_tokens": 1},
])
def test_extreme_sampling_values_never_crash_the_engine(http, engine, extra):
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 3, "temperature": 1.0,
            **extra}
    r = http.post("/v1/completions", json=body)
    assert r.status_code in (200, 400), r.text
    assert engine.is_alive
