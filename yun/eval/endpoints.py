"""Endpoints to compare: `NAME=URL[,model=M,key=K]` on the command line, or a YAML file

    endpoints:
      - {name: q8, url: http://127.0.0.1:8000, model: smollm2}
      - {name: hosted, url: https://api.example.com/v1, model: m-large, key: env:API_KEY}

`key: env:VAR` reads the key from the environment variable VAR. A URL with or without
the trailing /v1 is accepted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9_.:+-]+$")


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    model: str | None = None  # None: the first id of /v1/models
    key: str | None = None

    @property
    def api_root(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"endpoint name {self.name!r}: use letters, digits and _.:+-")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.name}: URL must start with http:// or https://, "
                             f"got {self.url!r}")

    def cache_identity(self) -> dict[str, Any]:
        """What a cached answer is keyed by (the key is left out: it changes nothing)."""
        return {"name": self.name, "url": self.api_root, "model": self.model}


def _key(value: str | None, where: str) -> str | None:
    if value and value.startswith("env:"):
        var = value[4:]
        if var not in os.environ:
            raise ValueError(f"{where}: environment variable {var} (key=env:{var}) is not set")
        return os.environ[var]
    return value


def parse_endpoint(spec: str) -> Endpoint:
    """`NAME=URL[,model=M,key=K]`."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--endpoint {spec!r}: expected NAME=URL[,model=...,key=...]")
    url, *opts = rest.split(",")
    extra: dict[str, str] = {}
    for opt in opts:
        k, sep, v = opt.partition("=")
        if not sep or k not in ("model", "key"):
            raise ValueError(f"--endpoint {spec!r}: unknown option {opt!r} (model=..., key=...)")
        extra[k] = v
    return Endpoint(name.strip(), url.strip(), extra.get("model") or None,
                    _key(extra.get("key"), f"endpoint {name}"))


def load_endpoints_file(path: str) -> list[Endpoint]:
    import yaml

    with open(os.path.expanduser(path), encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    rows = doc.get("endpoints") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list under 'endpoints'")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "name" not in row or "url" not in row:
            raise ValueError(f"{path}: endpoint {i + 1} needs 'name' and 'url'")
        unknown = set(row) - {"name", "url", "model", "key"}
        if unknown:
            raise ValueError(f"{path}: endpoint {row['name']}: unknown field(s) {sorted(unknown)}")
        out.append(Endpoint(str(row["name"]), str(row["url"]), row.get("model"),
                            _key(row.get("key"), f"{path}: endpoint {row['name']}")))
    return out


def check_unique(endpoints: list[Endpoint]) -> None:
    names = [e.name for e in endpoints]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"endpoint names must be unique, repeated: {dup}")
