"""Answers already received, one JSON line each, keyed by endpoint (name, URL, model) and
the exact request an item became: a rerun asks only what is missing (or what changed:
another prompt, max_tokens or model is another key). Failures are never stored, so a rerun
asks them again."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def cache_key(endpoint: dict[str, Any], path: str, body: dict[str, Any]) -> str:
    blob = json.dumps({"endpoint": endpoint, "path": path, "body": body}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class AnswerCache:
    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path and os.path.isfile(path):
            self._load(path)

    def _load(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interrupted run
                    continue
                if isinstance(row, dict) and "key" in row:
                    self.entries[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, item: str, response: dict[str, Any], latency_s: float) -> None:
        row = {"key": key, "item": item, "response": response, "latency_s": latency_s}
        self.entries[key] = row
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
