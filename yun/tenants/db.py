"""The database: an SQLAlchemy engine for SQLite (default; a file under the data folder,
WAL mode, every write transaction BEGIN IMMEDIATE, fsync'd commits) or PostgreSQL (psycopg
3), and the schema (created with `metadata.create_all`, versioned in a one-row table)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from yun.tenants.models import Base, SchemaVersion

SCHEMA_VERSION = 1
SQLITE_BUSY_MS = 30_000


def data_dir() -> Path:
    """$YUN_DATA_DIR, else $XDG_DATA_HOME/yun, else ~/.local/share/yun."""
    if os.environ.get("YUN_DATA_DIR"):
        return Path(os.environ["YUN_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "yun"


def default_url() -> str:
    return f"sqlite:///{data_dir() / 'tenants.db'}"


def normalize_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3; a bare path means an SQLite file."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str | None = None) -> Engine:
    url = normalize_url(url or default_url())
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if not url.startswith("postgresql"):
        raise ValueError(f"unsupported database URL {redact(url)!r}: use sqlite:///PATH or "
                         "postgresql://USER:PASSWORD@HOST/DB")
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
    except ImportError as e:
        raise RuntimeError("a PostgreSQL tenants database needs psycopg 3: pip install "
                           "'yun[postgres]'") from e


def _sqlite_engine(url: str) -> Engine:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000,
                                              "check_same_thread": False},
                           pool_size=8, max_overflow=16)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # a commit survives a crash or power loss
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock up front: admission checks and their inserts are one
        # serialized step, so limits hold exactly under concurrency.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def create_schema(engine: Engine) -> int:
    """Create missing tables and record the schema version; refuse a newer schema."""
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        row = s.scalar(select(SchemaVersion).where(SchemaVersion.id == 1))
        if row is None:
            s.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
            return SCHEMA_VERSION
        if row.version > SCHEMA_VERSION:
            raise RuntimeError(f"the tenants database has schema version {row.version}; this "
                               f"yun knows up to {SCHEMA_VERSION}: upgrade yun")
        for version in range(row.version + 1, SCHEMA_VERSION + 1):
            _MIGRATIONS[version](s)  # each step brings the schema from version - 1
            row.version = version
        return row.version


_MIGRATIONS: dict[int, Any] = {}  # version -> function(session); none yet beyond v1


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
