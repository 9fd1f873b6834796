"""The OpenAI API as the official SDK sees it, against a live server."""

from __future__ import annotations

import json
import math

import openai
import pytest

import yun
from yun import SamplingParams

MODEL = "tiny"  # the served_model_name of the `server` fixture
IGNORE_EOS = {"ignore_eos": True}  # a vLLM-style extra the SDK sends in extra_body
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."}]


def test_chat_completion_has_the_openai_shape(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == MODEL and isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_prompt_is_the_models_own_template(server, client, engine):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    text = engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(text, add_special_tokens=False))
    with server.http() as http:
        tok = http.post("/tokenize", json={"messages": CHAT}).json()
    assert tok["count"] == r.usage.prompt_tokens


def test_chat_accepts_text_parts_tool_messages_and_fields_clients_send(client):
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather?"},
                                     {"type": "text", "text": "In Paris."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=4, parallel_tool_calls=False,
        store=False, metadata={"k": "v"}, service_tier="auto", user="u1", tool_choice="none",
        response_format={"type": "text"}, extra_body={"strict": True, "top_k": 5, "min_p": 0.1,
                                                      "repetition_penalty": 1.1})
    assert r.usage.completion_tokens <= 4


def test_chat_stream_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    first, last = chunks[0], chunks[-1]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert last.choices == [] and last.usage is not None
    body = chunks[1:-1]
    text = "".join(c.choices[0].delta.content or "" for c in body)
    reasons = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None  # the finish chunk comes last
    assert last.usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_continuous_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, extra_body=IGNORE_EOS, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "text_completion"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body=IGNORE_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0 and item.bytes == list(item.token.encode("utf-8"))
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True)
    assert "".join(i.token for i in content) == r.choices[0].message.content


def test_chat_stream_logprobs_match_the_whole_response(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=2, extra_body=IGNORE_EOS)
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [item for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in full]


def test_completions_with_a_list_of_prompts_and_n(client):
    r = client.completions.create(model=MODEL, prompt=["Once upon", "The end"], n=2,
                                  max_tokens=4, temperature=1.0, seed=7)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens <= 16
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_chat_with_n_2_streamed_and_not(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=5, n=2, temperature=1.0, seed=3)
    full = client.chat.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1]
    assert full.choices[0].message.content != full.choices[1].message.content
    texts, roles, reasons = {0: "", 1: ""}, [], {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.append(c.index)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert sorted(roles) == [0, 1]
    assert texts == {c.index: c.message.content for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}


def test_completions_stream_matches_the_whole_response(client):
    kw = dict(model=MODEL, prompt=[[3707, 1879], [785, 3974, 3876]], max_tokens=6, temperature=0)
    full = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    reasons = {}
    usage = None
    for c in client.completions.create(stream=True, stream_options={"include_usage": True},
                                       **kw):
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
        usage = c.usage or usage
    assert texts == {c.index: c.text for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    assert usage.model_dump() == full.usage.model_dump()


def test_echo_logprobs_on_token_ids_match_the_engines_prompt_logprobs(client, offline):
    """lm-evaluation-harness loglikelihood: reads token_logprobs[ctxlen:-1]."""
    prompts = [[3707, 11, 1879, 0, 3555, 374], [785, 3974, 3876, 3835]]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, logprobs=1,
                                  echo=True, temperature=0)
    ref = offline.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    for ids, choice, out in zip(prompts, r.choices, ref):
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [out.prompt_logprobs[j][t].logprob for j, t in enumerate(ids) if j > 0]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        for j, t in enumerate(ids[1:], start=1):
            top = lp.top_logprobs[j]
            assert lp.tokens[j] in top and top[lp.tokens[j]] == lp.token_logprobs[j]
            assert max(top.values()) >= lp.token_logprobs[j]
            is_greedy = out.prompt_logprobs[j][t].rank == 1
            assert (lp.token_logprobs[j] == max(top.values())) == is_greedy
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        gen = out.outputs[0].token_ids[0]
        assert lp.tokens[-1] == offline.tokenizer.id_to_token(gen)
        assert choice.text == offline.tokenizer.decode(ids, skip_special_tokens=False) + \
            out.outputs[0].text
        assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 2


def test_streamed_echo_and_logprobs_match_the_whole_response(client):
    kw = dict(model=MODEL, prompt=[3707, 11, 1879], max_tokens=4, logprobs=2, echo=True,
              temperature=0, extra_body=IGNORE_EOS)
    full = client.completions.create(**kw).choices[0]
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                for key in lp:
                    lp[key] += getattr(c.logprobs, key)
    assert text == full.text
    assert lp == full.logprobs.model_dump()


def test_echo_with_max_tokens_zero_scores_only_the_prompt(client):
    ids = [3707, 11, 1879, 0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0


def test_completion_logprobs_without_echo(client):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, logprobs=2,
                                  temperature=0, extra_body=IGNORE_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) in (2, 3) for t in lp.top_logprobs)
    assert all(math.isclose(max(t.values()), x) for t, x in zip(lp.top_logprobs,
                                                                 lp.token_logprobs))


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0, extra_body=IGNORE_EOS)
    text = client.completions.create(max_tokens=12, **kw).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    r = client.completions.create(max_tokens=12, stop=[stop, "never-appears"], **kw)
    assert r.choices[0].text == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        max_tokens=12, stop=stop, stream=True, **kw) if c.choices)
    assert streamed == text[:text.find(stop)]


def test_length_only_on_real_truncation(client):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body=IGNORE_EOS,
                                  temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, extra_body=IGNORE_EOS)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kw).choices[0].message.content
    assert a == b and a != c


def test_models_health_version(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/version").json()["version"] == yun.__version__
        assert "yun" in http.get("/").text
        assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]


def test_tokenizer_endpoints(server, engine):
    with server.http() as http:
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|im_end|>" and info["pad_token"] == "<|endoftext|>"
        assert "bos_token" in info and "im_start" in info["chat_template"]
        tok = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert tok["tokens"] == engine.tokenizer.encode("Hello world")
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
        back = http.post("/detokenize", json={"tokens": tok["tokens"]}).json()
        assert back == {"prompt": "Hello world"}
        bad = http.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    with server.http() as http:
        text = http.get("/metrics").text
    for name in ("yun_requests_total{", "yun_prompt_tokens_total", "yun_generation_tokens_total",
                 "yun_time_to_first_token_seconds_bucket", "yun_time_per_output_token_seconds",
                 "yun_e2e_request_latency_seconds_count", "yun_num_requests_running",
                 "yun_num_requests_waiting", "yun_kv_cache_usage_ratio",
                 "yun_prefix_cache_hit_rate"):
        assert name in text, name
    assert 'route="/v1/completions",status="200"' in text


# ---- fields added for agents (issue 15) ------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens(client, engine):
    tok = engine.tokenizer.encode(" world", add_special_tokens=False)[0]  # one token
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                  logit_bias={str(tok): 100}, extra_body=IGNORE_EOS)
    assert r.choices[0].text == " world" * 4
    def first_token(**kw) -> int:  # the id of the first token drawn (text may re-encode apart)
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                      logprobs=0, extra_body=IGNORE_EOS, **kw)
        return engine.tokenizer.hf.convert_tokens_to_ids(r.choices[0].logprobs.tokens[0])

    first = first_token()
    assert first_token(logit_bias={str(first): -100}) != first


@pytest.mark.parametrize("bias", [{"x": 1}, {"5": 101}, {"-1": 1}, {"999999": 1}])
def test_bad_logit_bias_is_a_400(client, bias):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                       logit_bias=bias)
    assert info.value.body["param"] == "logit_bias"


@pytest.mark.parametrize("spec,check", [
    ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"regex": "[0-9]{3}"}, lambda t: len(t) == 3 and t.isdigit()),
    ({"json": {"type": "object", "properties": {"a": {"type": "integer"}},
               "required": ["a"], "additionalProperties": False}},
     lambda t: isinstance(json.loads(t)["a"], int)),
    ({"grammar": 'root ::= "ab" | "cd"'}, lambda t: t in ("ab", "cd")),
])
def test_structured_outputs_object(client, spec, check):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, seed=0,
                                       extra_body={"structured_outputs": spec})
    assert check(r.choices[0].message.content), r.choices[0].message.content


def test_structured_outputs_takes_one_kind(client):
    for spec in ({}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"regex": 5}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                           extra_body={"structured_outputs": spec})
        assert info.value.body["param"].startswith("structured_outputs"), spec


def test_cached_tokens_come_from_the_prefix_cache(client):
    long = [{"role": "user", "content": "Tell me about the sea. " * 12}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1)
    again = client.chat.completions.create(model=MODEL, messages=long, max_tokens=1)
    n = again.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < n
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0


def test_x_request_id_is_echoed_or_made(server):
    with server.http() as http:
        mine = http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
        made = http.get("/health")
    assert mine.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1"}], "messages[2].content"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c9",
                                          "content": "x"}], "messages[1].tool_call_id"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages[1].content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}],
     "messages[1].tool_calls[0]"),
])
def test_malformed_histories_are_a_400(client, messages, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert info.value.body["param"] == param, info.value.body


def test_several_api_keys_and_a_key_file(make_engine, start_server, tmp_path):
    from yun.server import ServerSettings, build_app

    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-from-file\n\n")
    eng = make_engine()
    live = start_server(build_app(eng, ServerSettings(
        port=0, served_model_name="m", api_key=("k1", "k2"), api_key_file=str(keys))), eng)
    try:
        for key in ("k1", "k2", "key-from-file"):
            assert live.client(api_key=key).models.list().data
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="k3").models.list()
        with live.http() as http:
            assert http.get("/v1/models", headers={"x-api-key": "k2"}).status_code == 200
            assert http.get("/v1/models", headers={"x-api-key": "nope"}).status_code == 401
    finally:
        eng.shutdown()
