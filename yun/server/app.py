"""The FastAPI app: routes of the OpenAI API (plus health, metrics and tokenizer routes)
over one engine client (yun/engine/client.py: AsyncEngine or RayReplicas). The server is
an adapter: it never touches torch or model state."""

from __future__ import annotations

import html
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

import yun
from yun.server.errors import APIError, install_error_handlers
from yun.server.metrics import ServerMetrics
from yun.server.middleware import ApiKeyAuth, BodyLimit, JsonBodies, RequestCounter, RequestIds
from yun.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                 ModelCard, ModelList, TokenizeRequest)
from yun.server.anthropic import AnthropicMessages, CountTokensRequest, MessagesRequest
from yun.server.chat import ChatCompletions
from yun.server.chat_pipeline import ChatPipeline
from yun.server.embeddings import EmbeddingRequest, Embeddings
from yun.server.responses import Responses, ResponsesRequest
from yun.server.completions import Completions
from yun.model_source import DEFAULT_MODEL_NAME
from yun.server.serving import OpenAIServing
from yun.server.settings import ServerSettings

if TYPE_CHECKING:
    from yun.engine.client import EngineClient
    from yun.tenants.gate import TenantGate

TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")
STATIC = Path(__file__).with_name("static")  # the chat page: index.html, app.js, style.css
# The page runs only its own script and talks only to this origin: even a rendering bug
# could not run model output as script or send it elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def model_name(settings: ServerSettings, model: str | None) -> str:
    """What clients call the model: --served-model-name, else MODEL as given, else the
    default model's name."""
    return settings.served_model_name or model or DEFAULT_MODEL_NAME


def _needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path.startswith(TOKENIZER_ROUTES)


def build_app(engine: "EngineClient", settings: ServerSettings) -> FastAPI:
    """The app for `engine`. Starting it starts the engine loop; stopping it leaves the
    engine running (whoever built the engine shuts it down, see `yun.server.serve`)."""
    name = model_name(settings, engine.config.model)
    metrics = ServerMetrics(engine, name)
    serving = OpenAIServing(engine, settings, name, metrics)
    pipeline = ChatPipeline(serving)
    chat, complete = ChatCompletions(pipeline), Completions(serving)
    messages = AnthropicMessages(pipeline)
    responses = Responses(pipeline)
    embeddings = Embeddings(serving)
    created = int(time.time())

    gate = _tenant_gate(settings, metrics)
    serving.tenants = gate

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if gate is None:
            yield
            return
        async with gate.running():
            yield

    app = FastAPI(title="yun", version=yun.__version__, lifespan=lifespan,
                  summary="An OpenAI-compatible server for open-weight language models.")
    install_error_handlers(app)
    app.state.serving = serving
    app.state.metrics = metrics

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat(req, raw)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await complete(req, raw)

    @app.post("/v1/embeddings")
    async def create_embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        return await embeddings(req)

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, raw: Request) -> Response:
        return await responses(req, raw)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return responses.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        return responses.delete(response_id)

    @app.post("/v1/messages")
    async def anthropic_messages(req: MessagesRequest, raw: Request) -> Response:
        return await messages(req, raw)

    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(req: CountTokensRequest) -> dict[str, int]:
        return await messages.count_tokens(req)

    def card() -> ModelCard:
        return ModelCard(id=name, created=created, root=engine.config.model or name,
                         max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        serving.check_model(model)
        return card()

    @app.get("/health")
    async def health() -> Response:
        # Serving replicas (yun.distributed.ray_replicas) also report each replica's state.
        states = engine.replica_states()
        extra = {"replicas": states} if states else {}
        if engine.is_alive:
            return JSONResponse({"status": "ok", **extra})
        err = APIError(503, "no replica is running" if extra else "the engine loop is not running")
        return JSONResponse({**err.body(), **extra}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": yun.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    for prefix in ("", "/v1"):
        app.add_api_route(prefix + "/tokenize", serving.tokenize, methods=["POST"])
        app.add_api_route(prefix + "/detokenize", serving.detokenize, methods=["POST"])
        app.add_api_route(prefix + "/tokenizer_info", serving.tokenizer_info, methods=["GET"])

    if settings.ui:  # the chat page, over the public API only
        app.mount("/static", _Revalidated(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def chat_page() -> FileResponse:
            return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)
    else:
        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def index(request: Request) -> str:
            return _landing_page(name, str(request.base_url).rstrip("/"))

    if gate is not None:
        _add_tenant_routes(app, gate, settings)
    routes = {getattr(r, "path", "") for r in app.routes}
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if gate is None:
        app.add_middleware(ApiKeyAuth, api_keys=settings.api_keys(), protected=_needs_key)
    else:
        from yun.server.tenancy import TenantAuth

        app.add_middleware(TenantAuth, gate=gate, protected=_needs_key)
    app.add_middleware(RequestCounter, routes=routes,
                       count=lambda route, status: metrics.requests.labels(
                           route=route, status=str(status)).inc())
    app.add_middleware(RequestIds)
    return app


def _tenant_gate(settings: ServerSettings, metrics: ServerMetrics) -> "TenantGate | None":
    """The tenants layer, in multi-tenant mode (its database opened, schema created)."""
    if not settings.multi_tenant:
        return None
    from yun.tenants.gate import TenantGate
    from yun.tenants.store import TenantStore

    return TenantGate(TenantStore(settings.database), metrics.registry,
                      api_keys=settings.api_keys(), admin_key=settings.admin_key)


def _add_tenant_routes(app: FastAPI, gate: "TenantGate", settings: ServerSettings) -> None:
    from yun.server.tenancy import admin_router, usage_router

    app.include_router(usage_router(gate))
    if settings.admin_key is not None:
        app.include_router(admin_router(gate))


class _Revalidated(StaticFiles):
    """Static files that browsers revalidate (a 304 when unchanged), so an upgraded yun
    never runs yesterday's app.js."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def curl_example(base_url: str, model: str, api_key: str | None = None) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}], '
            '"max_tokens": 32}' % model)
    return (f"curl {base_url}/v1/chat/completions -H 'Content-Type: application/json'"
            f"{auth} -d '{body}'")


def _landing_page(model: str, base_url: str) -> str:
    esc = html.escape
    rows: list[tuple[str, Any]] = [
        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/{id}"), ("DELETE", "/v1/responses/{id}"), ("GET", "/v1/models"),
        ("GET", "/health"), ("GET", "/version"), ("GET", "/metrics"),
        ("GET", "/tokenizer_info"), ("POST", "/tokenize"), ("POST", "/detokenize"),
        ("GET", "/docs")]
    items = "\n".join(f"<li><code>{m} {esc(p)}</code></li>" for m, p in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>yun</title></head>"
            f"<body><h1>yun {esc(yun.__version__)}</h1><p>Serving <b>{esc(model)}</b> with an "
            f"OpenAI-compatible API at <code>{esc(base_url)}/v1</code>.</p><ul>{items}</ul>"
            f"<p>Try:</p><pre>{esc(curl_example(base_url, model))}</pre></body></html>")
