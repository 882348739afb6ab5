"""Real sockets, many clients at once: an abort storm, a poison request amid healthy streams, and an
overload burst. After each, nothing runs, waits or holds a slot, and greedy output is unchanged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from rnnserve.config import ServerConfig
from tests.reliability.conftest import engine_idle, serve_in_thread
from tests.server.conftest import make_app

GREEDY = {"prompt": "The state of", "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
IDLE = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0, "rnnserve:state_pool_slots_used": 0.0}


def greedy_text(base_url: str) -> str:
    r = httpx.post(base_url + "/v1/completions", json=GREEDY, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def first_chunk_then_leave(client: httpx.AsyncClient, i: int) -> int:
    # 300 clients (one client's 300 streams at once would pass its fair share of the bound).
    body = {"prompt": f"storm {i}", "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 1 + i % 2}
    body["user"] = f"storm-{i}"
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code == 200:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # leave mid-stream: the connection closes with the response unread
        return r.status_code


def test_abort_storm_leaves_nothing_behind(rel_model_dir: Path) -> None:
    app = make_app(rel_model_dir, max_num_seqs=8, server=ServerConfig(max_queued_requests=600))
    with serve_in_thread(app) as base_url:
        before = greedy_text(base_url)

        async def storm() -> list[int]:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(first_chunk_then_leave(client, i) for i in range(300)))

        statuses = asyncio.run(storm())
        assert statuses.count(200) == 300
        assert engine_idle(base_url) == IDLE
        assert app.state.admission.in_flight == 0 and app.state.admission.num_live == 0
        assert app.state.edge.in_flight == 0
        assert greedy_text(base_url) == before


def test_a_poison_request_fails_alone(rel_model_dir: Path) -> None:
    app = make_app(rel_model_dir, max_num_seqs=8)
    sampler = app.state.ctx.engine.engine.sampler
    make_generator = sampler._generator

    def failing_generator(request):  # a fault only this request's parameters trigger, inside the step
        if request.params.seed == 666:
            raise RuntimeError("injected sampler fault")
        return make_generator(request)

    sampler._generator = failing_generator
    with serve_in_thread(app) as base_url:
        alone = greedy_text(base_url)

        async def mixed() -> tuple[list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

                async def healthy() -> str:
                    async with client.stream("POST", "/v1/completions", json={**GREEDY, "stream": True}) as r:
                        assert r.status_code == 200
                        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
                    assert events[-1] == "[DONE]"
                    chunks = [json.loads(e) for e in events[:-1]]
                    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
                    return "".join(c["choices"][0]["text"] for c in chunks)

                poison = {**GREEDY, "temperature": 1.0, "seed": 666, "max_tokens": 50}
                results = await asyncio.gather(
                    *(healthy() for _ in range(4)), client.post("/v1/completions", json=poison)
                )
                return list(results[:4]), results[4]

        texts, poisoned = asyncio.run(mixed())
        assert poisoned.status_code == 500 and poisoned.json()["error"]["code"] == "engine_error"
        assert "injected" not in poisoned.text
        assert texts == [alone] * 4
        assert engine_idle(base_url) == IDLE
        metrics = httpx.get(base_url + "/metrics").text
        assert 'vllm:request_success_total{finished_reason="error",model_name="tiny-mamba"} 1.0' in metrics


def test_overload_burst_gets_429s_and_every_accepted_request_finishes(rel_model_dir: Path) -> None:
    # 2 slots + 2 queued: at most 4 sequences in flight.
    app = make_app(rel_model_dir, max_num_seqs=2, server=ServerConfig(max_queued_requests=2))
    with serve_in_thread(app) as base_url:
        before = greedy_text(base_url)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
                body = {"prompt": "burst", "max_tokens": 8, "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(120)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            else:
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 8
        assert engine_idle(base_url) == IDLE
        assert app.state.edge.in_flight == 0  # the edge guard's count is back to 0 as well
        assert greedy_text(base_url) == before
