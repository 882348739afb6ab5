"""The FastAPI app: routes, API-key and body-size guards, engine start/stop in the lifespan."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rnnserve import __version__
from rnnserve.config import ServerConfig
from rnnserve.server.context import ServingContext
from rnnserve.server.engine_client import EngineClient
from rnnserve.server.errors import bad_request, error_body_json, install_error_handlers
from rnnserve.server.metrics import CONTENT_TYPE, ServerMetrics
from rnnserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    now,
)
from rnnserve.server.serving_chat import create_chat_completion, render_chat_prompt
from rnnserve.server.serving_completions import create_completion
from rnnserve.server.streaming import cancel_on_disconnect
from rnnserve.server.tokenizer import Tokenizer

logger = logging.getLogger("rnnserve.server")

# Paths that answer without an API key (probes and scrapers).
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = error_body_json(status, message, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class APIKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` matches, except on the open paths."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self._expected):
            await _send_error(
                send, 401, "missing or invalid API key (send Authorization: Bearer <key>)", "invalid_api_key"
            )
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length up front, and by counting a streamed body.

    The body is read here in full (our bodies are small JSON) and replayed to the app; after it,
    ``receive`` passes through so the app still sees the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over the limit of {self.max_bytes} bytes (--max-request-bytes)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, 413, too_large, "request_too_large")
            return
        chunks: list[bytes] = []
        total = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left before sending the body
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await _send_error(send, 413, too_large, "request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: Message = first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return replay
            return await receive()

        await self.app(scope, replay_receive, send)


class AssumeJSONMiddleware:
    """POST bodies are JSON whatever their Content-Type says, so ``curl -d '{...}'`` (which sends a
    form Content-Type) works without ``-H 'Content-Type: application/json'``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def build_app(
    engine: EngineClient,
    tokenizer: Tokenizer | None,
    *,
    model_name: str,
    model_root: str,
    server_config: ServerConfig | None = None,
) -> FastAPI:
    """The HTTP app around an engine. The lifespan starts the engine and shuts it down."""
    cfg = server_config or ServerConfig()
    metrics = ServerMetrics(model_name, engine.stats)
    ctx = ServingContext(
        engine=engine, tokenizer=tokenizer, metrics=metrics, model_name=model_name, model_root=model_root
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        logger.info(
            "rnnserve %s serving %r at http://%s:%d/v1 (OpenAI-compatible; metrics at /metrics)",
            __version__,
            model_name,
            cfg.host,
            cfg.port,
        )
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="rnnserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    # Starlette runs the last-added middleware first: the key is checked before a body is read.
    app.add_middleware(AssumeJSONMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_request_bytes)
    if cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=cfg.api_key)

    @app.get("/health")
    async def health() -> Response:
        # 503 once the engine's step loop is gone, so a container healthcheck notices.
        alive = getattr(engine, "is_running", True)
        return Response(status_code=200 if alive else 503)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = ModelCard(id=model_name, created=now(), root=model_root, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        ctx.check_model(model)
        return ModelCard(id=model_name, created=now(), root=model_root, max_model_len=engine.max_model_len).model_dump()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        response = await cancel_on_disconnect(request.receive, create_completion(ctx, body))
        return response if response is not None else Response(status_code=499)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        response = await cancel_on_disconnect(request.receive, create_chat_completion(ctx, body))
        return response if response is not None else Response(status_code=499)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        ctx.check_model(body.model)
        tok = ctx.require_tokenizer("/tokenize")
        if body.messages is not None:
            ids = render_chat_prompt(ctx, body).token_ids
        elif body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise bad_request("send a prompt or messages", param="prompt")
        strs = [tok.token_str(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs
        ).model_dump()

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        ctx.check_model(body.model)
        tok = ctx.require_tokenizer("/detokenize")
        bad = next((t for t in body.tokens if t < 0 or t >= max(tok.vocab_size, engine.vocab_size)), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of the vocabulary", param="tokens")
        return DetokenizeResponse(prompt=tok.decode(body.tokens)).model_dump()

    return app
