"""Take the README's screenshot of the chat page (docs/ui.png): a real two-turn conversation
with the default model (SmolLM2-135M-Instruct), in headless Debian Chromium driven by
Playwright, as tests/ui drives it. Starts `yun serve` on a free loopback port and always
stops it.

    .venv/bin/python scripts/ui_screenshot.py [--out docs/ui.png] [--model MODEL] [SERVE_ARGS]

Arguments it does not know go to `yun serve` as they are (e.g. --no-native-kernels).

Needs /usr/bin/chromium (apt-get install chromium) and playwright (pip install -e
'.[test]'); never `playwright install`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # as tests/ui/conftest.py
QUESTIONS = ["What is the capital of France?", "Name one famous museum there."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"yun serve exited with {server.returncode} before /health")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy /health at {url} within {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def screenshot(url: str, out: Path, args: argparse.Namespace) -> None:
    from playwright.sync_api import expect, sync_playwright

    timeout_ms = int(args.reply_timeout * 1000)
    expect.set_options(timeout=timeout_ms)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": args.width, "height": args.height})
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            expect(page.locator("#model")).not_to_have_text("…")  # /v1/models answered
            page.click("#settings summary")
            page.fill("#temperature", "0")  # greedy: the same picture every run
            page.fill("#max_tokens", str(args.max_tokens))
            page.click("#settings summary")
            for i, question in enumerate(QUESTIONS, 1):
                page.fill("#input", question)
                page.press("#input", "Enter")
                # Done when the page says so: Send back, Stop hidden, the numbers shown.
                expect(page.locator(".msg.assistant .meta")).to_have_count(i)
                expect(page.locator("#send")).to_be_visible()
                expect(page.locator("#stop")).to_be_hidden()
                expect(page.locator(".msg.assistant .meta").nth(i - 1)).to_contain_text("tok/s")
            # The conversation scrolls inside #messages: grow the window until none is hidden.
            hidden = page.evaluate("(m => m.scrollHeight - m.clientHeight)"
                                   "(document.getElementById('messages'))")
            if hidden > 0:
                page.set_viewport_size({"width": args.width, "height": args.height + hidden})
            page.locator("#input").blur()
            page.screenshot(path=str(out), full_page=True)
            if errors:
                raise RuntimeError(f"uncaught errors in the page: {errors}")
            for m in page.locator(".msg").all():
                print(m.inner_text().strip(), end="\n\n")
        finally:
            browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    ap.add_argument("--model", default=None, help="a model for `yun serve` (default: its own)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--reply-timeout", type=float, default=300.0)
    args, serve_args = ap.parse_known_args()
    if not os.path.exists(CHROMIUM):
        sys.exit(f"{CHROMIUM} is missing (apt-get install chromium)")

    t0 = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    yun = [str(Path(sys.executable).with_name("yun"))]
    if not os.path.exists(yun[0]):
        yun = [sys.executable, "-c", "import sys; from yun.cli import main; sys.exit(main())"]
    cmd = [*yun, "serve", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", str(port), *serve_args]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, server, args.start_timeout)
            print(f"server healthy after {time.monotonic() - t0:.1f} s", file=sys.stderr)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(url, args.out, args)
        except BaseException:
            stop(server)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            stop(server)
    print(f"wrote {args.out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
