"""The tables (SQLAlchemy 2 declarative models). Times are UTC epoch seconds (floats), so
SQLite and PostgreSQL store and compare them alike; `day` / `month` strings (UTC) are
stored beside them for grouping and for the quota counters."""

from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PRIORITY_CLASSES = {"interactive": 1, "batch": 0}  # class -> scheduler priority (higher first)
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent",
                "tokens_per_day", "tokens_per_month")


class Base(DeclarativeBase):
    pass


class LimitColumns:
    """Per-tenant or per-key limits; NULL = no limit."""

    requests_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, default=None)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, default=None)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger, default=None)


class SchemaVersion(Base):
    __tablename__ = "yun_schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Tenant(LimitColumns, Base):
    __tablename__ = "yun_tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    priority_class: Mapped[str] = mapped_column(String(32), default="interactive")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(LimitColumns, Base):
    __tablename__ = "yun_api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("yun_tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to tell keys apart
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the whole key
    models: Mapped[str | None] = mapped_column(Text, default=None)  # JSON list; NULL = all
    expires_at: Mapped[float | None] = mapped_column(Float, default=None)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[float] = mapped_column(Float)


class UsageRecord(Base):
    """One API request: inserted at admission (status "running", its reservation), finished
    with the real counts before the final response is sent."""

    __tablename__ = "yun_usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(80))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("yun_tenants.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("yun_api_keys.id"), default=None)
    model: Mapped[str] = mapped_column(String(256))
    instance: Mapped[str] = mapped_column(String(40))  # the server that ran it
    status: Mapped[str] = mapped_column(String(16))  # running completed cancelled failed interrupted
    started_at: Mapped[float] = mapped_column(Float)
    day: Mapped[str] = mapped_column(String(10))  # UTC YYYY-MM-DD of started_at
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)
    ttft_s: Mapped[float | None] = mapped_column(Float, default=None)
    reserved_tokens: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_yun_usage_tenant_time", "tenant_id", "started_at"),
                      Index("ix_yun_usage_key_time", "key_id", "started_at"),
                      Index("ix_yun_usage_status", "status", "instance"))

    @property
    def charged(self) -> int:
        """Tokens this request counts for: its reservation while it runs (or if its server
        died), the real count once it ended."""
        if self.status in ("running", "interrupted"):
            return self.reserved_tokens
        return self.prompt_tokens + self.completion_tokens


class QuotaCounter(Base):
    """Tokens charged to a tenant or key in one day or month (reservations included)."""

    __tablename__ = "yun_quota_counters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))  # tenant | key
    subject_id: Mapped[int] = mapped_column(Integer)
    period: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD or YYYY-MM
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (UniqueConstraint("scope", "subject_id", "period"),)


class Instance(Base):
    """A running server; its heartbeat says its running requests are still alive."""

    __tablename__ = "yun_instances"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
