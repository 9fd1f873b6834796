"""`yun serve`: an OpenAI-compatible HTTP server over the AsyncEngine (FastAPI + uvicorn).

    from yun.config import EngineConfig
    from yun.server import ServerSettings, serve
    serve(EngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct"), ServerSettings(port=8000))
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import TYPE_CHECKING, Awaitable, Callable

import uvicorn

from yun.server.app import build_app, curl_example, model_name
from yun.server.settings import ServerSettings

if TYPE_CHECKING:
    from yun.config import EngineConfig

log = logging.getLogger("yun.server")


class _Server(uvicorn.Server):
    """uvicorn.Server that says where it listens once it does, ends in-flight requests
    itself when the grace period is over, and returns normally after Ctrl-C / SIGTERM."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[int], None],
                 stop_requests: Callable[[], Awaitable[None]], grace: float):
        super().__init__(config)
        self.on_ready, self.stop_requests, self.grace = on_ready, stop_requests, grace

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            port = self.config.port
            if self.servers and self.servers[0].sockets:
                port = self.servers[0].sockets[0].getsockname()[1]
            self.on_ready(port)

    async def shutdown(self, sockets: list | None = None) -> None:
        # uvicorn waits for in-flight requests, then cancels them (a traceback each).
        # Before that, once the grace period is over, end them cleanly: a stream gets an
        # error event, a plain request a 503.
        async def stop_late() -> None:
            await asyncio.sleep(self.grace)
            await self.stop_requests()

        stopper = asyncio.create_task(stop_late())
        try:
            await super().shutdown(sockets)
        finally:
            stopper.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal after shutting down, which would kill the process
        # before the engine is shut down; we return from serve() instead.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests
        self.should_exit = True


def serve(engine_config: "EngineConfig", settings: ServerSettings) -> None:
    """Load the model, serve until Ctrl-C / SIGTERM, then shut everything down.

    On shutdown, in-flight requests get `settings.shutdown_timeout` seconds to finish;
    then they are aborted and the engine loop stops.
    """
    from yun.demo import DEMO_NOTICE
    from yun.engine.async_engine import AsyncEngine  # imports torch: only when serving
    from yun.model_source import DEMO_RANDOM

    if engine_config.model == DEMO_RANDOM:
        print(f"yun: {DEMO_NOTICE}", flush=True)
    if settings.replicas > 1 or settings.ray_address:  # N engines on Ray, routed here
        from yun.distributed.ray_replicas import RayReplicas

        engine = RayReplicas(engine_config, settings.replicas, settings.ray_address,
                             settings.routing)
    else:
        engine = AsyncEngine(engine_config)
    try:
        app = build_app(engine, settings)
        name = model_name(settings, engine_config.model)

        def ready(port: int) -> None:
            host = settings.host
            shown = f"[{host}]" if ":" in host else host
            if host in ("0.0.0.0", "::"):
                shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
            base = f"http://{shown}:{port}"
            print(f"yun: serving {name} at {base}/v1 (Ctrl-C to stop)", flush=True)
            # With tenants, keys are never printed: the line shows where one goes.
            key = ("$YUN_API_KEY" if settings.multi_tenant
                   else next(iter(settings.api_keys()), None))
            print(f"yun: try: {curl_example(base, name, key)}", flush=True)

        async def stop_requests() -> None:
            app.state.serving.draining = True
            await asyncio.to_thread(engine.shutdown)  # every generation ends with an error

        grace = settings.shutdown_timeout
        config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                log_level=settings.log_level, timeout_keep_alive=5,
                                timeout_graceful_shutdown=grace + 5)  # type: ignore[arg-type]
        _Server(config, ready, stop_requests, grace).run()
    finally:
        engine.shutdown()
        print("yun: stopped", flush=True)


__all__ = ["ServerSettings", "build_app", "serve"]
