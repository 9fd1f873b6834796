"""Where the chat page is served, and `--no-ui` (no browser needed)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.ui.conftest import MODEL
from yun.cli import build_parser
from yun.server import ServerSettings, build_app
from yun.server.app import STATIC


def test_chat_page_and_its_files_are_served_at_the_root(ui_engine):
    client = TestClient(build_app(ui_engine, ServerSettings(served_model_name=MODEL)))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert r.headers["cache-control"] == "no-cache"


def test_the_page_script_never_writes_html():
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write|eval\(",
                         script)


def test_no_ui_serves_the_plain_landing_page_instead(ui_engine):
    client = TestClient(build_app(ui_engine, ServerSettings(ui=False,
                                                            served_model_name=MODEL)))
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "app.js" not in page.text
    assert client.get("/static/app.js").status_code == 404


def test_serve_has_a_no_ui_flag():
    parser = build_parser()
    assert parser.parse_args(["serve"]).ui is True
    assert parser.parse_args(["serve", "--no-ui"]).ui is False
