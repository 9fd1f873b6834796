"""The chat page at / in headless Chromium, against live servers (tiny random Qwen2).

Replies of a random model are meaningless, so the tests pin what the page does with them:
the request it sends, the text it assembles, what a reload keeps, that Stop aborts on the
server, and that untrusted text (stored, or streamed by a mocked server) stays text.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import pytest

from tests.ui.conftest import API_KEY, MODEL, browser_missing, finished_counts, metric, wait_for

if browser_missing():
    pytest.skip(browser_missing(), allow_module_level=True)

from playwright.sync_api import Page, Route, expect  # noqa: E402

CHAT = "**/v1/chat/completions"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 1">'
# The decode rate is left out when a reply arrives in one burst (< 20 ms after its first
# token: the tiny test model, now with a small vocabulary, is that fast).
STATS = r"\d+ tokens · TTFT \d+\.\d\d s( · \d+\.\d tok/s)?"


# ---- driving the page ------------------------------------------------------------------
def open_chat(page: Page, server, **settings) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_have_text(MODEL)
    if settings:
        page.click("#settings summary")
        for name, value in settings.items():
            page.fill(f"#{name}", str(value))
        page.click("#settings summary")


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_done(page: Page) -> None:
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()


def stored(page: Page) -> list[dict]:
    return page.evaluate("JSON.parse(localStorage.getItem('yun.chat')).messages")


def sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def chunk(finish_reason: str | None = None, usage: dict | None = None, **delta) -> dict:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": MODEL, "choices": choices, "usage": usage}


def mock_reply(page: Page, **fulfill) -> None:
    page.unroute(CHAT)
    page.route(CHAT, lambda route: route.fulfill(**fulfill))


# ---- the tests -------------------------------------------------------------------------
def test_a_message_streams_a_reply_with_its_numbers(ui_server, page):
    open_chat(page, ui_server, system="You are terse.", max_tokens=16, seed=7)
    with page.expect_request(CHAT) as request:
        send(page, "Hello there")
    body = request.value.post_data_json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL and body["max_tokens"] == 16 and body["seed"] == 7
    assert "temperature" not in body and "top_p" not in body  # blank: the server's default
    assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hello there"}]
    wait_done(page)
    expect(page.locator(".msg.user .body")).to_have_text("Hello there")
    expect(page.locator(".msg.assistant .body")).not_to_be_empty()
    expect(page.locator(".msg.assistant .meta")).to_have_text(
        re.compile(rf"^16 tokens · TTFT \d+\.\d\d s( · \d+\.\d tok/s)? · max tokens reached$"))  # no rate for a one-burst reply (see STATS)
    expect(page.locator(".msg.assistant .thinking")).to_be_hidden()  # no reasoning here
    # The page put together exactly the text the API generates for the same request.
    body.pop("stream_options")
    full = httpx.post(ui_server.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": False}).json()
    assert stored(page)[-1]["content"] == full["choices"][0]["message"]["content"]


def test_two_turns_survive_a_reload_and_new_chat_clears_them(ui_server, page, tmp_path):
    open_chat(page, ui_server, max_tokens=40)
    send(page, "Hello! Who are you?")
    wait_done(page)
    first = stored(page)[1]["content"]
    with page.expect_request(CHAT) as request:
        send(page, "Write a haiku about the sea.")
    assert request.value.post_data_json["messages"] == [
        {"role": "user", "content": "Hello! Who are you?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Write a haiku about the sea."}]
    wait_done(page)
    expect(page.locator(".msg.assistant .meta")).to_have_text([re.compile(STATS)] * 2)

    shot = tmp_path / "two-turns.png"  # the test's artifact; YUN_UI_SCREENSHOT keeps a copy
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("YUN_UI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["YUN_UI_SCREENSHOT"])

    bodies = page.locator(".msg .body").all_inner_texts()
    metas = page.locator(".msg .meta").all_inner_texts()
    page.reload()
    expect(page.locator("#model")).to_have_text(MODEL)
    expect(page.locator(".msg")).to_have_count(4)
    assert page.locator(".msg .body").all_inner_texts() == bodies
    assert page.locator(".msg .meta").all_inner_texts() == metas
    expect(page.locator("#max_tokens")).to_have_value("40")  # settings are kept too

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    expect(page.locator("#model")).to_have_text(MODEL)
    expect(page.locator(".msg")).to_have_count(0)


def test_stop_aborts_the_generation_on_the_server(ui_server, ui_engine, page):
    counts_before = finished_counts(ui_server)
    before = counts_before.get("abort", 0.0)
    open_chat(page, ui_server, max_tokens=30000, seed=3)
    # A random model may sample its end token at any step (and where depends on the
    # threads: an xdist worker has one CPU), so the page's request also asks to ignore it:
    # the reply can only end by the stop button.
    page.route(CHAT, lambda route: route.continue_(post_data=json.dumps(
        {**route.request.post_data_json, "ignore_eos": True})))
    send(page, "Tell me a very long story.")
    expect(page.locator(".msg.assistant .body")).not_to_be_empty()  # text streams in ...
    try:
        expect(page.locator("#stop")).to_be_visible()  # ... while the reply is unfinished
    except AssertionError as e:  # the reply ended by itself: say how
        raise AssertionError(f"the reply ended before the stop: {stored(page)[-1]}, "
                             f"finished {counts_before} -> {finished_counts(ui_server)}, "
                             f"max_model_len {ui_engine.max_model_len}") from e
    assert metric(ui_server, "yun_num_requests_running") == 1
    page.click("#stop")
    wait_done(page)
    expect(page.locator(".msg.assistant .meta")).to_have_text(
        re.compile(r"^TTFT \d+\.\d\d s · stopped$"))
    assert wait_for(lambda: metric(ui_server, "yun_num_requests_running") == 0
                    and ui_engine.num_unfinished == 0)
    assert wait_for(lambda: finished_counts(ui_server).get("abort", 0.0) == before + 1), (
        counts_before, finished_counts(ui_server))
    reply = stored(page)[-1]
    assert reply["stopped"] and reply["content"] and "pending" not in reply


def test_stored_html_and_markdown_are_shown_as_text(ui_server, page):
    reply = (f"{HOSTILE}\n\n**bold** and `<b>code</b>` and [a link](https://example.com/x) "
             f"and [bad](javascript:window.__pwned=1)\n\n```html\n{HOSTILE}\n```\n\n- one\n- two")
    page.goto(ui_server.url + "/")
    page.evaluate("m => localStorage.setItem('yun.chat', JSON.stringify({messages: m}))",
                  [{"role": "user", "content": HOSTILE},
                   {"role": "assistant", "content": reply, "reasoning": HOSTILE}])
    page.reload()
    expect(page.locator(".msg.user .body")).to_have_text(HOSTILE)
    body = page.locator(".msg.assistant .body")
    expect(body.locator("p").first).to_have_text(HOSTILE)
    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("p code")).to_have_text("<b>code</b>")
    expect(body.locator("pre code")).to_have_text(HOSTILE)
    expect(body.locator("li")).to_have_text(["one", "two"])
    expect(body.locator("a")).to_have_count(1)
    expect(body.locator("a")).to_have_attribute("href", "https://example.com/x")
    expect(body.locator("a")).to_have_attribute("rel", re.compile("noopener"))
    expect(body).to_contain_text("[bad](javascript:window.__pwned=1)")
    expect(page.locator(".thinking .content")).to_have_text(HOSTILE)
    assert page.locator("#messages").locator("script, img, b").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_a_streamed_reply_with_reasoning_and_html_is_rendered_safely(ui_server, page):
    stream = sse(chunk(role="assistant", content=""),
                 chunk(reasoning_content="Let me think "),
                 chunk(reasoning_content="<img src=x onerror=window.__pwned=1>"),
                 chunk(content="<scr"), chunk(content="ipt>window.__pwned = 1</scr"),
                 chunk(content="ipt> and **done**"), chunk(finish_reason="stop"),
                 chunk(usage={"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}))
    open_chat(page, ui_server)
    mock_reply(page, status=200, content_type="text/event-stream", body=stream)
    send(page, HOSTILE)
    wait_done(page)
    expect(page.locator(".msg.user .body")).to_have_text(HOSTILE)
    thinking = page.locator(".msg.assistant .thinking")
    expect(thinking).to_be_visible()
    expect(thinking.locator("summary")).to_have_text(re.compile(r"^Thought for \d+\.\d s$"))
    expect(thinking.locator(".content")).to_have_text(
        "Let me think <img src=x onerror=window.__pwned=1>")
    body = page.locator(".msg.assistant .body")
    expect(body).to_have_text("<script>window.__pwned = 1</script> and done")
    expect(body.locator("strong")).to_have_text("done")
    expect(page.locator(".msg.assistant .meta")).to_have_text(re.compile(r"^7 tokens · TTFT"))
    assert page.locator("#messages").locator("script, img").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_api_errors_are_messages_in_the_conversation(ui_server, page):
    errors = page.locator(".msg.error .body")
    open_chat(page, ui_server, max_tokens=100000)
    send(page, "Hi")  # the server refuses: more tokens than the context holds
    expect(errors).to_have_text([re.compile(r"^Error 400: .*max_tokens.*context length")])
    wait_done(page)
    expect(page.locator(".msg.assistant")).to_have_count(0)

    busy = {"error": {"message": "the server is busy; retry shortly",
                      "type": "rate_limit_error", "param": None, "code": "queue_full"}}
    mock_reply(page, status=429, json=busy)
    send(page, "Again")
    expect(errors.nth(1)).to_have_text("Error 429: the server is busy; retry shortly")
    wait_done(page)

    broken = sse(chunk(role="assistant", content=""), chunk(content="Once upon"),
                 {"error": {"message": "the server is shutting down", "code": None}})
    mock_reply(page, status=200, content_type="text/event-stream", body=broken)
    send(page, "A story")
    expect(errors.nth(2)).to_have_text("Error: the server is shutting down")
    expect(page.locator(".msg.assistant .body")).to_have_text("Once upon")  # kept
    wait_done(page)

    page.unroute(CHAT)
    page.route(CHAT, lambda route: route.abort())
    with page.expect_request(CHAT) as request:
        send(page, "Anyone there?")
    expect(errors.nth(3)).to_contain_text("Could not reach the server")
    wait_done(page)
    sent = request.value.post_data_json["messages"]  # errors are shown, never sent
    assert [m["role"] for m in sent] == ["user", "user", "user", "assistant", "user"]
    assert [m["role"] for m in stored(page)].count("error") == 4


def test_the_api_key_is_asked_for_and_sent_only_as_a_bearer_token(key_server, page):
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(key_server.url + "/")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key", "not-the-key")
    page.press("#key", "Enter")
    expect(page.locator("#key-error")).to_have_text("That key was refused.")
    page.fill("#key", API_KEY)
    page.press("#key", "Enter")
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#model")).to_have_text(MODEL)
    page.click("#settings summary")
    page.fill("#max_tokens", "4")
    with page.expect_request(CHAT) as request:
        send(page, "Hi")
    assert request.value.headers["authorization"] == f"Bearer {API_KEY}"
    wait_done(page)
    expect(page.locator(".msg.assistant .meta")).to_contain_text("4 tokens")
    assert urls and not any(API_KEY in u or "not-the-key" in u for u in urls)
    assert API_KEY not in json.dumps(page.evaluate("Object.entries(localStorage)"))
