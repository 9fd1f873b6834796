"""Live servers for the HTTP tests: the app from `build_app` run by uvicorn in a background
thread on a free loopback port, over a tiny random-weight Qwen2 (loaded once per session)."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import openai
import pytest
import uvicorn

from yun.config import EngineConfig
from yun.engine.async_engine import AsyncEngine
from yun.server import ServerSettings, build_app

KV_BYTES = 4 * 2**20  # 512 blocks of 16 tokens for the tiny model: plenty, and quick
API_KEY = "test-key-123"


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (free port) from a daemon thread."""

    def __init__(self, app, engine: AsyncEngine):
        self.app, self.engine = app, engine
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = ""

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=60, **kw)

    def async_client(self, api_key: str = "none", **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=60, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


def _engine(path: str, **overrides) -> AsyncEngine:
    config = EngineConfig(model=path, kv_cache_memory=KV_BYTES, **overrides)
    return AsyncEngine(config)


@pytest.fixture(scope="session")
def engine(qwen2_path) -> Iterator[AsyncEngine]:
    eng = _engine(qwen2_path)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def server(engine) -> Iterator[LiveServer]:
    """The default server: no API key, the engine's full queue."""
    live = LiveServer(build_app(engine, ServerSettings(port=0, served_model_name="tiny")),
                      engine).start()
    yield live
    live.stop()


@pytest.fixture(scope="session")
def strict_server(qwen2_path) -> Iterator[LiveServer]:
    """A server with an API key, one running slot plus one queued, and a small body cap."""
    eng = _engine(qwen2_path, max_num_seqs=1)
    settings = ServerSettings(port=0, api_key=API_KEY, max_queue=1, max_body_bytes=64 * 1024)
    live = LiveServer(build_app(eng, settings), eng).start()
    yield live
    live.stop()
    eng.shutdown()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def make_engine(qwen2_path):
    """A fresh AsyncEngine over the tiny checkpoint (EngineConfig overrides as keywords)."""
    return lambda **overrides: _engine(qwen2_path, **overrides)


@pytest.fixture(scope="session")
def start_server() -> Iterator:
    """Start a LiveServer for (app, engine); stopped at the end of the session."""
    started: list[LiveServer] = []

    def start(app, engine: AsyncEngine) -> LiveServer:
        started.append(LiveServer(app, engine).start())
        return started[-1]

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def offline(qwen2_path):
    """The offline API over the same checkpoint: the reference for served results."""
    import yun

    return yun.LLM(qwen2_path, kv_cache_memory=KV_BYTES)
