"""One endpoint's HTTP client: at most `concurrency` requests in flight, retries on
429 / 5xx / connection errors with a short backoff, and every failure returned as a
message (never raised), so one bad endpoint never stops a run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from yun.eval.endpoints import Endpoint

RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class Reply:
    response: dict[str, Any] | None  # the JSON body on success
    error: str | None
    latency_s: float


class EndpointClient:
    def __init__(self, endpoint: Endpoint, concurrency: int, timeout_s: float, retries: int):
        self.endpoint = endpoint
        self.retries = retries
        self.limit = asyncio.Semaphore(max(1, concurrency))
        headers = {"Authorization": f"Bearer {endpoint.key}"} if endpoint.key else {}
        self.http = httpx.AsyncClient(
            base_url=endpoint.api_root, headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=max(1, concurrency)))

    async def close(self) -> None:
        await self.http.aclose()

    async def model(self) -> str:
        """The endpoint's model: the configured one, else the first of /v1/models."""
        if self.endpoint.model:
            return self.endpoint.model
        resp = await self.http.get("/models")
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if not data:
            raise RuntimeError(f"{self.endpoint.api_root}/models lists no model")
        return str(data[0]["id"])

    async def post(self, path: str, body: dict[str, Any]) -> Reply:
        async with self.limit:
            start = time.perf_counter()
            error = "no attempt"
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(min(0.25 * 2 ** attempt, 4.0))
                try:
                    resp = await self.http.post(path, json=body)
                except httpx.TimeoutException as e:
                    return Reply(None, f"timed out ({type(e).__name__})",
                                 time.perf_counter() - start)
                except (httpx.HTTPError, OSError) as e:
                    error = f"{type(e).__name__}: {e}"
                    continue
                if resp.status_code == 200:
                    try:
                        return Reply(resp.json(), None, time.perf_counter() - start)
                    except ValueError:
                        return Reply(None, "HTTP 200 with a body that is not JSON",
                                     time.perf_counter() - start)
                error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    break
            return Reply(None, error, time.perf_counter() - start)
