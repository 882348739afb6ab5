"""A small synchronous Python client for an rnnserve (or any OpenAI-compatible) server.

Only httpx, no torch: ``Client("http://127.0.0.1:8000").complete("Hello", max_tokens=8)``.
For the full OpenAI surface use the ``openai`` package with ``base_url=<server>/v1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx


class Client:
    """Completions and chat, plain or streamed, plus health, models and metrics."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0):
        root = base_url.rstrip("/")
        self.root = root[: -len("/v1")] if root.endswith("/v1") else root
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.root, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        resp = self._http.get("/v1/models")
        resp.raise_for_status()
        return [m["id"] for m in resp.json()["data"]]

    def metrics(self) -> str:
        resp = self._http.get("/metrics")
        resp.raise_for_status()
        return resp.text

    def _model(self, model: str | None) -> str:
        return model or self.models()[0]

    def complete(self, prompt: str, model: str | None = None, **params: object) -> str:
        body = {"model": self._model(model), "prompt": prompt, **params}
        resp = self._http.post("/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()["choices"][0]["text"]

    def chat(self, messages: list[dict[str, str]], model: str | None = None, **params: object) -> str:
        body = {"model": self._model(model), "messages": messages, **params}
        resp = self._http.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return resp.json()["choices"][0]["message"]["content"] or ""

    def stream_complete(self, prompt: str, model: str | None = None, **params: object) -> Iterator[str]:
        yield from self._stream("/v1/completions", {"model": self._model(model), "prompt": prompt, **params})

    def stream_chat(self, messages: list[dict[str, str]], model: str | None = None, **params: object) -> Iterator[str]:
        yield from self._stream("/v1/chat/completions", {"model": self._model(model), "messages": messages, **params})

    def _stream(self, path: str, body: dict) -> Iterator[str]:
        """Yield the text pieces of an SSE stream; raise on an HTTP error or an error chunk."""
        with self._http.stream("POST", path, json={**body, "stream": True}) as resp:
            if resp.status_code != 200:
                resp.read()
                resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"server error: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta")
                    piece = (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")
                    if piece:
                        yield piece
