"""Priority classes for the scheduler: a request's rank is its priority plus one for every
`aging_s` seconds it has existed, so a low class waits longer but never forever.

Higher rank is admitted and scheduled first and preempted last; equal ranks keep their
queue order (FIFO, preempted requests first). This module imports no torch.
"""

from __future__ import annotations

from typing import Iterable

from yun.engine.request import Request


def rank(req: Request, now: float, aging_s: float) -> float:
    """priority + whole ageing periods since arrival (requests of one class that arrived
    within one period tie, so the order among them stays FIFO)."""
    return req.params.priority + max(0.0, now - req.arrival_time) // aging_s


def order_running(running: list[Request], now: float, aging_s: float) -> None:
    """Sort in place, highest rank first (stable): the last one is the first to preempt."""
    if len(running) > 1:
        running.sort(key=lambda r: -rank(r, now, aging_s))


def next_waiting(waiting: Iterable[Request], now: float, aging_s: float) -> Request:
    """The highest-ranked waiting request (the first of the queue among equals)."""
    return max(waiting, key=lambda r: rank(r, now, aging_s))
