"""Interactive TTFT under a batch flood, with and without priority classes.

A multi-tenant server (in-process uvicorn, SQLite tenants database in a temp folder) over
the default model (SmolLM2-135M-Instruct Q4_1) or MODEL; a batch tenant floods it with
FLOOD streamed requests of BATCH_TOKENS tokens; meanwhile an interactive tenant sends
PROBES requests (one every 0.7 s, from 1 s on) and we time their first token. Then the same with the
probe tenant in the batch class (no priority). Prints one JSON object.

    PYTHONPATH=. python scripts/tenant_priority_bench.py [--model M] [--max-num-seqs 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server.conftest import LiveServer  # noqa: E402
from yun.config import EngineConfig  # noqa: E402
from yun.engine.async_engine import AsyncEngine  # noqa: E402
from yun.server import ServerSettings, build_app  # noqa: E402
from yun.tenants.store import TenantStore  # noqa: E402

ADMIN = "bench-admin-key-0123"


async def _ttft(c: httpx.AsyncClient, key: str, tokens: int) -> float:
    body = {"model": "m", "prompt": "Write about the sea.", "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    async with c.stream("POST", "/v1/completions", json=body,
                        headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        first = None
        async for line in r.aiter_lines():
            if first is None and '"text":"' in line:
                first = time.perf_counter() - start
    return first if first is not None else float("nan")


async def _run(url: str, bulk: str, probe: str, args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=args.flood + 8)) as c:
        flood = [asyncio.create_task(_ttft(c, bulk, args.batch_tokens))
                 for _ in range(args.flood)]
        async def later(delay: float) -> float:  # probes arrive while the flood runs
            await asyncio.sleep(delay)
            return await _ttft(c, probe, 8)

        probes = await asyncio.gather(*(later(1.0 + 0.7 * i) for i in range(args.probes)))
        batch = await asyncio.gather(*flood)
    return {"probe_ttft_median_s": round(statistics.median(probes), 3),
            "probe_ttft_max_s": round(max(probes), 3),
            "batch_ttft_median_s": round(statistics.median(batch), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--flood", type=int, default=24)
    p.add_argument("--batch-tokens", type=int, default=48)
    p.add_argument("--probes", type=int, default=5)
    args = p.parse_args()
    engine = AsyncEngine(EngineConfig(model=args.model, max_num_seqs=args.max_num_seqs))
    out: dict = {"max_num_seqs": args.max_num_seqs, "flood": args.flood,
                 "batch_tokens": args.batch_tokens}
    try:
        for mode in ("warm-up", "interactive", "batch"):
            with tempfile.TemporaryDirectory() as tmp:
                db = f"sqlite:///{tmp}/t.db"
                store = TenantStore(db)
                store.create_tenant("bulk", "batch")
                store.create_tenant("probe", "batch" if mode == "warm-up" else mode)
                bulk, probe = store.create_key("bulk")[0], store.create_key("probe")[0]
                settings = ServerSettings(port=0, database=db, admin_key=ADMIN,
                                          served_model_name="m")
                live = LiveServer(build_app(engine, settings), engine).start()
                try:
                    start = time.perf_counter()
                    result = asyncio.run(_run(live.url, bulk, probe, args))
                    result["wall_s"] = round(time.perf_counter() - start, 1)
                    result["steps_per_s"] = round(engine.stats.steps / result["wall_s"], 1)
                    if mode != "warm-up":  # the first run pays for warming up
                        out[f"probe_class_{mode}"] = result
                    engine.stats.steps = 0
                finally:
                    live.stop()
    finally:
        engine.shutdown()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
