"""A tiny OpenAI-compatible streaming server for client-side tests (bench serve, locust, chat).

It "generates" ``tok0 tok1 ...`` with a short sleep per token, honours ``max_tokens``, streams SSE
chunks in the OpenAI shapes (completions and chat), sends a usage chunk when
``stream_options.include_usage`` is set, and answers ``/tokenize`` by splitting on whitespace.
Everything it received is kept in ``StubServer.requests`` (and each Authorization header in
``authorizations``) so tests can check what clients sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class StubServer:
    url: str
    token_delay_s: float
    requests: list[dict] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)  # each request's Authorization header
    api_key: str | None = None  # when set, /v1/models answers 401 to any other bearer token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app(state: StubServer) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models(request: Request) -> object:
        state.authorizations.append(request.headers.get("authorization"))
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            error = {"message": "missing or invalid API key", "type": "authentication_error", "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401)
        return {"object": "list", "data": [{"id": "stub-model", "object": "model", "owned_by": "test"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await request.json()
        n = len(str(body.get("prompt", "")).split())
        return {"tokens": list(range(n)), "count": n, "max_model_len": 4096}

    async def complete(request: Request, chat: bool) -> object:
        body = await request.json()
        state.requests.append(body)
        state.authorizations.append(request.headers.get("authorization"))
        if body.get("model") not in (None, "stub-model"):
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError"}}, status_code=404)
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in body["messages"])
        else:
            prompt = str(body["prompt"])
        n_in, n_out = len(prompt.split()), int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(f"tok{i} " for i in range(n_out))
            message = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choice = {"index": 0, **message}
            return {"id": "x", "object": kind, "choices": [choice | {"finish_reason": "length"}], "usage": usage}

        async def events() -> AsyncIterator[str]:
            for i in range(n_out):
                await asyncio.sleep(state.token_delay_s)
                piece = f"tok{i} "
                if chat:
                    delta = {"content": piece} | ({"role": "assistant"} if i == 0 else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": None}
                if i == n_out - 1:
                    choice["finish_reason"] = "length"
                yield f"data: {json.dumps({'id': 'x', 'object': kind + '.chunk', 'choices': [choice]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'x', 'object': kind + '.chunk', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> object:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> object:
        return await complete(request, chat=True)

    return app


@contextmanager
def stub_server(token_delay_s: float = 0.005, api_key: str | None = None) -> Iterator[StubServer]:
    """Serve the stub on 127.0.0.1:<free port> in a background thread for the ``with`` block."""
    port = free_port()
    state = StubServer(url=f"http://127.0.0.1:{port}", token_delay_s=token_delay_s, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("stub server did not start")
        time.sleep(0.02)
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=5)
