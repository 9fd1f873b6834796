"""Bad input and overload: the right status, the OpenAI error object, the SDK's exception."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hi"}]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", -1), ("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0),
    ("top_p", 1.5), ("n", 0), ("top_k", -2), ("min_p", 2.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("min_tokens", -1),
    ("top_logprobs", 50), ("temperature", "hot"), ("n", 1.5), ("stop", 5), ("seed", 2**70),
    ("max_completion_tokens", -3), ("messages", []), ("stream", "maybe"),
])
def test_invalid_chat_field_is_a_400_naming_it(client, field, value):
    body = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                       extra_body={**body, field: value})
    err = info.value.body
    assert err["param"] == field and field in err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": [-1, 5]}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**8]}, "prompt"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ({}, "prompt"),
])
def test_invalid_completion_request_is_a_400(server, body, param):
    with server.http() as http:
        err = _error(http.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert err["param"] == param, err


def test_invalid_json_is_a_400(server):
    with server.http() as http:
        for raw in (b"{not json", b"[1, 2]", b"", b'"text"'):
            err = _error(http.post("/v1/chat/completions", content=raw,
                                   headers={"content-type": "application/json"}), 400)
            assert err["message"]


def test_a_json_body_is_read_whatever_its_content_type(server):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
    with server.http() as http:
        for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
            headers = {"content-type": ctype} if ctype else {}
            r = http.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 200, (ctype, r.text)


def test_context_overflow_states_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1] * 500, max_tokens=100)
    message = info.value.body["message"]
    assert "500" in message and "100" in message and "512" in message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1] * 600, max_tokens=1)
    assert "600" in info.value.body["message"] and "512" in info.value.body["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_unknown_route_is_a_404_error_object(server):
    with server.http() as http:
        _error(http.get("/v1/nothing-here"), 404)
        _error(http.get("/v1/chat/completions"), 405)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "frobnicate"}}}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
])
def test_unsupported_or_invalid_features_are_a_clear_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                          "extra_body": body})
    assert info.value.body["param"] == param, info.value.body


def test_tools_with_tool_choice_none_are_fine(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, tools=tools,
                                       tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_api_key(strict_server, api_key):
    with pytest.raises(openai.AuthenticationError):
        strict_server.client(api_key="wrong").models.list()
    with strict_server.http() as http:
        err = _error(http.post("/v1/completions", json={"prompt": "x"}), 401)
        assert err["code"] == "invalid_api_key"
        _error(http.post("/tokenize", json={"prompt": "x"}), 401)
        # Health and metrics stay open for probes.
        assert http.get("/health").status_code == 200
    assert strict_server.client(api_key=api_key).models.list().data


def test_without_a_key_an_empty_bearer_is_accepted(server):
    # httpx refuses to send a header value with trailing space, so write the request by hand.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n"
                     b"Connection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    with server.http() as http:
        assert http.get("/v1/models", headers={"Authorization": "Bearer"}).status_code == 200


def test_body_over_the_limit_is_a_413(strict_server, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    big = {"model": "x", "prompt": "a" * (70 * 1024)}
    with strict_server.http() as http:
        _error(http.post("/v1/completions", json=big, headers=headers), 413)

        def chunks():  # no Content-Length: counted as it arrives
            data = json.dumps(big).encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        _error(http.post("/v1/completions", content=chunks(), headers=headers), 413)
    with pytest.raises(openai.APIStatusError) as info:
        strict_server.client(api_key=api_key).completions.create(
            model="x", prompt="a" * 70000)
    assert info.value.status_code == 413


def test_queue_full_is_a_429_with_retry_after(strict_server, api_key):
    """One running slot plus one queued: a third request is refused, nothing is lost."""
    model = strict_server.client(api_key=api_key).models.list().data[0].id
    headers = {"Authorization": f"Bearer {api_key}"}
    # n=8 children share the one slot in turn: seconds of work, however fast the model.
    body = {"model": model, "prompt": "Hello", "max_tokens": 500, "n": 8, "stream": True,
            "ignore_eos": True}
    with strict_server.http() as http:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as a, \
                http.stream("POST", "/v1/completions", json=body, headers=headers) as b:
            assert a.status_code == b.status_code == 200
            lines = a.iter_lines()  # keep a reference: dropping it closes the connection
            assert next(lines).startswith("data: ")  # the running one has produced tokens
            r = http.post("/v1/completions", json={**body, "stream": False}, headers=headers)
            err = _error(r, 429)
            assert r.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                strict_server.client(api_key=api_key).completions.create(
                    model=model, prompt="x", max_tokens=1)
        # Closing both streams aborts them: the server soon takes requests again.
        deadline = time.monotonic() + 5
        while True:
            r = http.post("/v1/completions", headers=headers,
                          json={"model": model, "prompt": "x", "max_tokens": 1})
            if r.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
    assert strict_server.engine.num_unfinished == 0


def test_a_dead_engine_gives_503_not_a_hang(make_engine, start_server):
    from yun.server import ServerSettings, build_app

    eng = make_engine()
    live = start_server(build_app(eng, ServerSettings(port=0, served_model_name="m")), eng)
    eng.shutdown()
    with live.http() as http:
        _error(http.get("/health"), 503)
        for stream in (False, True):
            _error(http.post("/v1/completions", json={"prompt": "x", "stream": stream}), 503)
    with pytest.raises(openai.InternalServerError):
        live.client().chat.completions.create(model="m", messages=CHAT)
