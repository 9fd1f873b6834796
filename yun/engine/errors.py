"""Errors the engine's callers handle (torch-free, so the server can name them)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a crash or shutdown), or the replica that held a request
    died: the request cannot be served."""
