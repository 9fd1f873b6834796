"""Real databases for the tenants tests: an SQLite file per test, and a throwaway
PostgreSQL cluster per session (scripts/pg_test_server.sh; Debian's `postgresql`) with a
fresh database per test. The PostgreSQL tests skip only when its binaries are absent."""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_SCRIPT = ROOT / "scripts" / "pg_test_server.sh"


def _pg_binaries() -> bool:
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and Path(out.stdout.strip(), "initdb").exists():
            return True
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a running throwaway PostgreSQL server (its `postgres` database)."""
    if not _pg_binaries():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are absent: apt-get install "
                    "postgresql")
    folder = tempfile.mkdtemp(prefix="yun-pg-")
    out = subprocess.run(["bash", str(PG_SCRIPT), "start", folder, str(_free_port())],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:  # the binaries are there: a failure to start is a failure
        raise RuntimeError(f"pg_test_server.sh failed: {out.stderr}\n"
                           f"{Path(folder, 'initdb.log').read_text(errors='replace') if Path(folder, 'initdb.log').exists() else ''}")
    yield out.stdout.strip()
    subprocess.run(["bash", str(PG_SCRIPT), "stop", folder], timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def fresh_pg_database(server_url: str) -> str:
    import psycopg

    name = f"yun_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty tenants database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tenants.db'}"
    return fresh_pg_database(request.getfixturevalue("pg_server"))


class Clock:
    """A settable time.time for the ledger tests."""

    def __init__(self, start: float = 1_796_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


ADMIN_KEY = "admin-key-0123456789"


@pytest.fixture(scope="session")
def tenant_engine(qwen2_path):
    """One engine for the tenant servers (each test builds its own app and database)."""
    from tests.server.conftest import _engine

    eng = _engine(qwen2_path)
    yield eng
    eng.shutdown()


class TenantServer:
    """A live multi-tenant server over a fresh database, with admin helpers."""

    def __init__(self, live, url: str):
        self.live, self.db_url = live, url
        self.url = live.url
        self.admin = live.http(headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def tenant(self, name: str, cls: str = "interactive", **limits) -> dict:
        r = self.admin.post("/admin/tenants", json={"name": name, "class": cls,
                                                      "limits": limits})
        assert r.status_code == 201, r.text
        return r.json()

    def key(self, tenant: str, **extra) -> str:
        r = self.admin.post("/admin/keys", json={"tenant": tenant, **extra})
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def records(self, tenant: str | None = None) -> list[dict]:
        params = {"since": "1d", **({"tenant": tenant} if tenant else {})}
        r = self.admin.get("/admin/usage", params=params)
        assert r.status_code == 200, r.text
        return r.json()["data"]


@pytest.fixture
def make_tenant_server(tenant_engine, start_server_once):
    """Build a multi-tenant server (ServerSettings overrides as keywords) on `db_url`."""
    from yun.server import ServerSettings, build_app

    def make(db_url: str, engine=None, **overrides) -> TenantServer:
        eng = engine or tenant_engine
        settings = ServerSettings(port=0, served_model_name="tiny", database=db_url,
                                  admin_key=ADMIN_KEY, **overrides)
        return TenantServer(start_server_once(build_app(eng, settings), eng), db_url)

    return make


@pytest.fixture
def start_server_once() -> Iterator:
    from tests.server.conftest import LiveServer

    started: list = []

    def start(app, engine):
        started.append(LiveServer(app, engine).start())
        return started[-1]

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def tenant_server(db_url, make_tenant_server) -> TenantServer:
    return make_tenant_server(db_url)
