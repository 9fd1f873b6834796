"""`yun.server.serve` as a process: prints its URL when ready, serves, and stops cleanly on
Ctrl-C / SIGTERM even with a stream in flight. And the server never imports torch."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

KV_BYTES = 4 * 2**20


def _reader(proc: subprocess.Popen) -> "queue.Queue[str]":
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: "queue.Queue[str]", pattern: str, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"{pattern!r} not printed; got:\n{''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_url_and_shuts_down_cleanly_with_a_stream_in_flight(qwen2_path, sig):
    code = (
        "from yun.config import EngineConfig\n"
        "from yun.server import ServerSettings, serve\n"
        f"serve(EngineConfig(model={qwen2_path!r}, kv_cache_memory={KV_BYTES}),\n"
        "      ServerSettings(port=0, served_model_name='tiny', shutdown_timeout=1,\n"
        "                     log_level='warning'))\n")
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = _reader(proc)
        url = _wait_for(lines, r"yun: serving tiny at (http://127\.0\.0\.1:\d+)/v1").group(1)
        _wait_for(lines, r"yun: try: curl " + re.escape(url) + "/v1/chat/completions")
        r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text

        got: list[str] = []
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 500, "ignore_eos": True,
                "stream": True}

        def stream() -> None:
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as s:
                    for line in s.iter_lines():
                        got.append(line)
            except httpx.HTTPError as e:  # the server may cut the stream off: fine
                got.append(f"closed: {e!r}")

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        while not got:
            time.sleep(0.01)
        start = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - start < 10
        _wait_for(lines, r"yun: stopped", timeout=5)
        t.join(5)
        assert not t.is_alive()
        # The stream finished, or was ended with an error event (after the 1 s grace).
        last = [line for line in got if line][-1]
        assert last == "data: [DONE]" or "the server is shutting down" in last, last
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_server_package_never_imports_torch():
    code = ("import sys\n"
            "import yun.server, yun.server.app, yun.server.serving, yun.server.protocol\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
