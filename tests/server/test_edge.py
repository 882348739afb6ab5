"""EdgeGuard: the bound on HTTP requests in flight that answers 429 before the app runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rnnserve.config import ServerConfig
from rnnserve.server import edge
from rnnserve.server.edge import EdgeGuard, edge_bounds
from tests.server.conftest import make_app


def scope(address: str, path: str = "/v1/completions") -> dict:
    return {"type": "http", "method": "POST", "path": path, "headers": [], "client": (address, 1234)}


class HeldApp:
    """An ASGI app whose requests stay in flight until ``release`` (or fail when ``fail`` is set)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen = 0
        self.fail = False

    async def __call__(self, scope: dict, receive, send) -> None:
        self.seen += 1
        if self.fail:
            raise RuntimeError("the app failed")
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def call(guard: EdgeGuard, sc: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await guard(sc, receive, send)
    return sent


def status(sent: list[dict]) -> int:
    return sent[0]["status"]


def test_past_the_bounds_a_request_gets_the_openai_429_without_reaching_the_app() -> None:
    async def run() -> None:
        app = HeldApp()
        guard = EdgeGuard(app, max_requests=3, max_per_address=2, open_paths=("/health",))
        held = [asyncio.create_task(call(guard, scope("10.0.0.1"))) for _ in range(2)]
        await asyncio.sleep(0)
        assert guard.in_flight == 2 and guard.in_flight_of("10.0.0.1") == 2

        refused = await call(guard, scope("10.0.0.1"))  # past its address's bound
        assert status(refused) == 429
        headers = dict(refused[0]["headers"])
        assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
        assert headers[b"connection"] == b"close"
        error = json.loads(refused[1]["body"])["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"
        assert app.seen == 2  # the app never saw it

        other = asyncio.create_task(call(guard, scope("10.0.0.2")))  # another address: room left
        await asyncio.sleep(0)
        assert guard.in_flight == 3 and app.seen == 3
        assert status(await call(guard, scope("10.0.0.3"))) == 429  # past the bound in all
        # Open paths are neither counted nor refused.
        opened = asyncio.create_task(call(guard, scope("10.0.0.3", "/health")))
        await asyncio.sleep(0)
        assert app.seen == 4 and guard.in_flight == 3

        app.release.set()
        for sent in await asyncio.gather(*held, other, opened):
            assert status(sent) == 200
        assert guard.in_flight == 0 and guard.in_flight_of("10.0.0.1") == 0 and guard.refused == 2

    asyncio.run(run())


def test_a_failing_request_still_leaves_the_count() -> None:
    async def run() -> None:
        app = HeldApp()
        app.fail = True
        guard = EdgeGuard(app, max_requests=1, max_per_address=1)
        with pytest.raises(RuntimeError):
            await call(guard, scope("10.0.0.1"))
        assert guard.in_flight == 0 and guard.in_flight_of("10.0.0.1") == 0

    asyncio.run(run())


def test_no_bound_refuses_nothing() -> None:
    async def run() -> None:
        app = HeldApp()
        app.release.set()
        guard = EdgeGuard(app, max_requests=None, max_per_address=None)
        statuses = await asyncio.gather(*(call(guard, scope("10.0.0.1")) for _ in range(50)))
        assert [status(s) for s in statuses] == [200] * 50 and guard.refused == 0

    asyncio.run(run())


def test_idle_after_many_requests_trims_the_c_heap_once(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(edge, "release_free_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(edge, "TRIM_DELAY_S", 0.0)

    async def run() -> None:
        app = HeldApp()
        app.release.set()
        guard = EdgeGuard(app, max_requests=None, max_per_address=None, trim_after=10)
        await asyncio.gather(*(call(guard, scope("10.0.0.1")) for _ in range(9)))
        await asyncio.sleep(0.01)
        assert trims == []  # too few requests since the last trim
        await asyncio.gather(*(call(guard, scope("10.0.0.1")) for _ in range(5)))
        await asyncio.sleep(0.01)
        assert trims == [1]
        await asyncio.sleep(0.01)
        assert trims == [1]

    asyncio.run(run())


def test_release_free_heap_runs_where_the_c_library_has_it() -> None:
    assert edge.release_free_heap() in (True, False)


def test_the_served_app_is_behind_bounds_derived_from_admission(model_dir: Path) -> None:
    # 2 slots + 3 queued: 5 sequences in flight; per address 5 + 2 HTTP requests, twice that in all.
    app = make_app(model_dir, max_num_seqs=2, server=ServerConfig(max_queued_requests=3))
    guard = app.state.edge
    assert (guard.max_requests, guard.max_per_address) == (14, 7) == edge_bounds(5, 2)
    with TestClient(guard) as client:
        r = client.post("/v1/completions", json={"prompt": "edge", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert client.get("/health").status_code == 200
    assert guard.in_flight == 0 and guard.refused == 0
    assert edge_bounds(None, 2) == (None, None)
