"""The FastAPI app: routes, Host / API-key / Content-Type / body-size guards, admission control,
engine start/stop in the lifespan."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rnnserve import __version__
from rnnserve.config import ServerConfig
from rnnserve.server.admission import Admission, client_key, per_client_share, raw_fanout
from rnnserve.server.context import ServingContext
from rnnserve.server.edge import EdgeGuard, edge_bounds
from rnnserve.server.engine_client import EngineClient
from rnnserve.server.errors import APIError, bad_request, error_body_json, install_error_handlers
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
from rnnserve.server.sampling_defaults import SamplingDefaults
from rnnserve.server.serving_chat import create_chat_completion, render_chat_prompt
from rnnserve.server.serving_completions import create_completion
from rnnserve.server.serving_states import SaveStateRequest, list_states, save_state
from rnnserve.server.streaming import cancel_on_disconnect
from rnnserve.server.tokenizer import Tokenizer

logger = logging.getLogger("rnnserve.server")

# Paths that answer without an API key (probes and scrapers).
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")


async def _send_error(send: Send, status: int, message: str, code: str, *, close: bool = False) -> None:
    body = error_body_json(status, message, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413 or close:
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


def _host_name(header: bytes) -> str:
    """``Host`` header -> name without the port: ``[::1]:8000`` -> ``[::1]``, ``a.b:80`` -> ``a.b``."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AllowedHostsMiddleware:
    """400 unless the ``Host`` header names one of ``allowed`` (port ignored): DNS rebinding."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host")
        if host is None or _host_name(host) not in self.allowed:
            await _send_error(send, 400, "this Host is not served here (--allowed-hosts)", "invalid_host")
            return
        await self.app(scope, receive, send)


class RequireJSONMiddleware:
    """415 for a POST whose Content-Type is not ``application/json``.

    A web page can send a cross-origin ``text/plain`` or form POST without a CORS preflight; only
    ``application/json`` needs one. Requiring it means no page can make this server generate.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
                message = "send the body as JSON with 'Content-Type: application/json'"
                await _send_error(send, 415, message, "unsupported_media_type", close=True)
                return
        await self.app(scope, receive, send)


async def _receive_by(receive: Receive, deadline: float | None) -> Message:
    """``receive()``, or TimeoutError at the loop time ``deadline``. From 3.11 on without a task of its
    own (``asyncio.wait_for`` wraps the call in one, a suspension and ~1 KiB per request even when the
    body is already there: with a burst's thousands of requests at once, that is their peak heap)."""
    if deadline is None:
        return await receive()
    timeout_at = getattr(asyncio, "timeout_at", None)
    if timeout_at is None:  # Python 3.10
        return await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
    async with timeout_at(deadline):
        return await receive()


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length up front, and by counting a streamed body;
    408 for a body that does not arrive within ``read_timeout`` seconds (a slow client holds nothing).

    The body is read here in full (our bodies are small JSON) and replayed to the app; after it,
    ``receive`` passes through so the app still sees the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

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
        loop = asyncio.get_running_loop()
        deadline = None if self.read_timeout is None else loop.time() + self.read_timeout
        while True:
            try:
                message = await _receive_by(receive, deadline)
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                message = f"the request body did not arrive within {self.read_timeout:g} s"
                await _send_error(send, 408, message, "request_timeout", close=True)
                return
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


class AdmissionGateMiddleware:
    """429 / 503 for a generation request that admission refuses, decided on the raw JSON body before
    routing, validation and tokenization. A burst's excess then costs the event loop one JSON parse
    each instead of the whole handler (about 10x more), so the requests it admits, and other
    clients', are not held up behind the refusals. The decision is ``Admission.refusal`` on the
    fan-out and client key the handler computes (the handler's ``admit`` still reserves); a body
    that is not a well-formed request, or whose fan-out is a 400, goes on to the handler's answer.
    While ``Admission.could_refuse()`` is false (room for any fan-out), bodies pass unparsed, so an
    admitted request is not parsed twice. Sits inside ``BodyLimitMiddleware``, which delivers the
    whole body in one message.
    """

    PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is chat

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chat = self.PATHS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if chat is None or not self.admission.could_refuse():
            await self.app(scope, receive, send)
            return
        message = await receive()
        refusal = self._refusal(scope, message, chat) if message["type"] == "http.request" else None
        if refusal is not None:
            body = json.dumps(refusal.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
            # Closed after the answer: an overloaded server does not also keep a refused client's
            # connection (uvicorn's objects for it, ~4 KiB) until that client gets round to closing it.
            headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await self.app(scope, replay_receive, send)

    def _refusal(self, scope: Scope, message: Message, chat: bool) -> APIError | None:
        try:
            body = json.loads(message.get("body", b""))
        except ValueError:  # not JSON (or not UTF-8): the handler's 400
            return None
        fanout = raw_fanout(body, chat)
        if fanout is None:
            return None
        user = body.get("user")
        address = scope["client"][0] if scope.get("client") else None
        refusal = self.admission.refusal(fanout, client_key(user if isinstance(user, str) else None, address))
        return refusal if refusal is not None and refusal.status != 400 else None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": "an OpenAI-shaped error"} for status in statuses}


# What each kind of route can answer besides 200 (the OpenAPI document lists exactly these).
_GENERATE_ERRORS = _errors(400, 401, 404, 408, 413, 415, 429, 500, 503)
_POST_ERRORS = _errors(400, 401, 404, 408, 413, 415, 500)
_GET_ERRORS = _errors(401, 404)


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for validation errors; this server answers them with 400 (as OpenAI)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def build_app(
    engine: EngineClient,
    tokenizer: Tokenizer | None,
    *,
    model_name: str,
    model_root: str,
    server_config: ServerConfig | None = None,
    edge_guard: type[EdgeGuard] = EdgeGuard,
) -> FastAPI:
    """The HTTP app around an engine. The lifespan starts the engine and shuts it down. The ASGI app to
    serve is ``app.state.edge``: the app behind an ``edge_guard`` (a subclass where the server needs
    more of it, as Ray Serve's ingress does) with the bounds derived here."""
    cfg = server_config or ServerConfig()
    metrics = ServerMetrics(model_name, engine.stats)
    try:
        slots: int | None = engine.stats().num_slots
    except Exception:  # an engine client without stats: the queue cannot be sized to its pool
        slots = None
    queued = cfg.max_queued_requests if cfg.max_queued_requests is not None else slots
    max_in_flight = None if slots is None or queued is None else slots + queued
    admission = Admission(
        max_in_flight=max_in_flight,
        max_fanout=cfg.max_fanout,
        max_per_client=per_client_share(cfg.max_in_flight_per_client, slots, queued),
    )
    ctx = ServingContext(
        engine=engine,
        tokenizer=tokenizer,
        metrics=metrics,
        model_name=model_name,
        model_root=model_root,
        admission=admission,
        request_timeout=cfg.request_timeout,
        sampling_defaults=SamplingDefaults.from_model_folder(model_root),
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
            # Whatever still runs ends with finish_reason "abort" and a proper end of response.
            admission.start_draining()
            admission.interrupt_all()
            await engine.shutdown()

    app = FastAPI(title="rnnserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.admission = admission
    # What uvicorn serves: the app behind the edge bound on HTTP requests in flight (edge.py).
    max_requests, max_per_address = edge_bounds(max_in_flight, slots)
    app.state.edge = edge_guard(app, max_requests=max_requests, max_per_address=max_per_address, open_paths=OPEN_PATHS)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    # Starlette runs the last-added middleware first: Host, then CORS, then the key, then the
    # Content-Type, all before a body is read; then the body limit and the admission gate.
    # Innermost: refuses what admission would refuse, once the body is read and before routing.
    app.add_middleware(AdmissionGateMiddleware, admission=admission)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_request_bytes, read_timeout=cfg.read_timeout)
    app.add_middleware(RequireJSONMiddleware)
    if cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=cfg.api_key)
    if cfg.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if cfg.allowed_hosts is not None:
        app.add_middleware(AllowedHostsMiddleware, allowed=cfg.allowed_hosts)

    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 once the engine's step loop is gone (a container healthcheck notices) or while draining
        # (a load balancer stops sending).
        alive = getattr(engine, "is_running", True)
        if admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # root is the served name: the server's local model path is nobody's business.
    @app.get("/v1/models", responses=_GET_ERRORS)
    async def models() -> dict[str, Any]:
        card = ModelCard(id=model_name, created=now(), root=model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model:path}", responses=_GET_ERRORS)
    async def model(model: str) -> dict[str, Any]:
        ctx.check_model(model)
        return ModelCard(id=model_name, created=now(), root=model_name, max_model_len=engine.max_model_len).model_dump()

    @app.post("/v1/completions", response_model=None, responses=_GENERATE_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        client = client_key(body.user, request.client.host if request.client else None)
        response = await cancel_on_disconnect(request.receive, create_completion(ctx, body, client))
        return response if response is not None else Response(status_code=499)

    @app.post("/v1/chat/completions", response_model=None, responses=_GENERATE_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        client = client_key(body.user, request.client.host if request.client else None)
        response = await cancel_on_disconnect(request.receive, create_chat_completion(ctx, body, client))
        return response if response is not None else Response(status_code=499)

    @app.post("/v1/states", responses=_POST_ERRORS)
    async def states_save(body: SaveStateRequest) -> dict[str, Any]:
        return await save_state(ctx, body)

    @app.get("/v1/states", responses=_GET_ERRORS)
    async def states_list() -> dict[str, Any]:
        return list_states(ctx)

    @app.post("/tokenize", responses=_POST_ERRORS)
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

    @app.post("/detokenize", responses=_POST_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        ctx.check_model(body.model)
        tok = ctx.require_tokenizer("/detokenize")
        bad = next((t for t in body.tokens if t < 0 or t >= max(tok.vocab_size, engine.vocab_size)), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of the vocabulary", param="tokens")
        return DetokenizeResponse(prompt=tok.decode(body.tokens)).model_dump()

    return app
