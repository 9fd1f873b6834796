"""The chat page in a real browser: headless Chromium from Debian's packages
(/usr/bin/chromium, `.ci/run` installs it) driven by Playwright for Python, against live
servers over a tiny random-weight Qwen2. Browser tests skip, saying why, without them.

Never `playwright install`: it downloads a browser of its own; we launch Debian's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Iterator

import httpx
import pytest

from tests.server.conftest import LiveServer
from yun.config import EngineConfig
from yun.engine.async_engine import AsyncEngine
from yun.server import ServerSettings, build_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
MODEL = "tiny"
API_KEY = "ui-key-456"
TIMEOUT_MS = 30_000  # a shared 2-core machine can be slow; every wait is on an event


def browser_missing() -> str | None:
    """Why browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="package")
def ui_engine(checkpoint_factory) -> Iterator[AsyncEngine]:
    """The tiny Qwen2 with a 32k-token context, so a reply can run long enough to stop
    (it makes ~1,000 tokens a second: 4,000 could end before a busy browser looks)."""
    path = checkpoint_factory("qwen2", max_position_embeddings=32768)
    engine = AsyncEngine(EngineConfig(model=path, kv_cache_memory=24 * 2**20))
    yield engine
    engine.shutdown()


def _live(engine: AsyncEngine, **settings) -> Iterator[LiveServer]:
    app = build_app(engine, ServerSettings(port=0, served_model_name=MODEL, **settings))
    live = LiveServer(app, engine).start()
    yield live
    live.stop()


@pytest.fixture(scope="package")
def ui_server(ui_engine) -> Iterator[LiveServer]:
    yield from _live(ui_engine)


@pytest.fixture(scope="package")
def key_server(ui_engine) -> Iterator[LiveServer]:
    """The same engine behind a second app that needs an API key."""
    yield from _live(ui_engine, api_key=API_KEY)


@pytest.fixture(scope="package")
def browser():
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    # Under xdist this worker is pinned to one CPU (tests/conftest.py), and Chromium would
    # inherit it: one core shared with the engine thread that streams tokens to it, and
    # in a loaded suite a click or a key press then waited past its timeout (seen twice
    # on a 2-core Xeon). The browser and its driver are started with every CPU.
    pinned = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if pinned is not None:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    pw = None
    try:
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except BaseException:
        if pw is not None:
            pw.stop()
        raise
    finally:
        if pinned is not None:
            os.sched_setaffinity(0, pinned)
    try:
        yield browser
        browser.close()
    finally:
        pw.stop()


@pytest.fixture
def page(browser):
    """A fresh page (its own storage). Uncaught script errors fail the test."""
    context = browser.new_context(viewport={"width": 960, "height": 720})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def metric(server: LiveServer, sample: str) -> float:
    """One sample of /metrics, named as Prometheus prints it (labels included); 0 if absent."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def finished_counts(server: LiveServer) -> dict[str, float]:
    """yun_request_finished_total by finish reason (for a failing assertion's message)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^yun_request_finished_total\{finish_reason="([^"]+)"\} (\S+)$', text, re.M)}


def wait_for(check, timeout: float = 20.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()
