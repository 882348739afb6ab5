"""What a careless or hostile client sends gets a 4xx, never a 5xx or a crash: numeric ranges, NaN,
lone surrogates, the context limit, wrong Content-Type or Host, too much work at once; and the
protocol details (405 with Allow, /health, OpenAPI statuses, SSE line framing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rnnserve.config import ServerConfig, default_allowed_hosts
from rnnserve.server.app import build_app
from rnnserve.server.streaming import sse, sse_data
from tests.server.conftest import make_app
from tests.server.test_api import FailingEngine, assert_error, sse_events, wait_idle

LONG = {"max_tokens": 100_000, "ignore_eos": True, "temperature": 0.0}


def post_raw(client: TestClient, path: str, body: str) -> object:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"prompt": "x", "max_tokens": 2, "seed": 18446744073709551616}', "seed"),
        ('{"prompt": "x", "max_tokens": 2, "seed": -9223372036854775809}', "seed"),
        ('{"prompt": "x", "max_tokens": 2, "top_k": 18446744073709551616, "top_p": 0.5}', "top_k"),
        ('{"prompt": "x", "max_tokens": 2, "temperature": NaN}', "temperature"),
        ('{"prompt": "x", "max_tokens": 2, "top_p": Infinity}', "top_p"),
        ('{"prompt": "x", "max_tokens": 2, "presence_penalty": -Infinity}', "presence_penalty"),
    ],
)
def test_numbers_the_sampler_cannot_take_are_400(app_client: TestClient, body: str, param: str) -> None:
    err = assert_error(post_raw(app_client, "/v1/completions", body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_extreme_but_valid_numbers_work(app_client: TestClient) -> None:
    # seed + i for n > 1 passes int64 but not uint64: torch takes it.
    body = {"prompt": "x", "max_tokens": 3, "seed": 2**63 - 1, "n": 2, "top_k": 2**31 - 1, "top_p": 0.5}
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]
    r = app_client.post("/v1/completions", json={**body, "seed": -(2**63)})
    assert r.status_code == 200, r.text


def test_tiny_temperature_gives_text_and_finite_logprobs(app_client: TestClient) -> None:
    body = {"prompt": "x", "max_tokens": 3, "temperature": 1e-40, "logprobs": 2, "ignore_eos": True}
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"]
    values = choice["logprobs"]["token_logprobs"] + [
        v for top in choice["logprobs"]["top_logprobs"] for v in top.values()
    ]
    assert values and all(math.isfinite(v) for v in values)


def test_lone_surrogates_are_400(app_client: TestClient) -> None:
    # json.dumps escapes the lone half as \ud800, which JSON parsers accept and tokenizers cannot encode.
    for path, body in [
        ("/v1/completions", {"prompt": "a\ud800b"}),
        ("/v1/completions", {"prompt": ["ok", "\udfff"]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud83d"}]}),
        ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}),
        ("/tokenize", {"prompt": "\ud800"}),
    ]:
        err = assert_error(post_raw(app_client, path, json.dumps(body)), 400)
        assert "surrogate" in err["message"]
    wait_idle(app_client)


def test_a_prompt_must_leave_room_for_one_token(model_dir: Path) -> None:
    with TestClient(make_app(model_dir, max_model_len=8)) as client:
        err = assert_error(client.post("/v1/completions", json={"prompt": list(range(100, 108))}), 400, "prompt")
        assert err["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"prompt": list(range(100, 107)), "ignore_eos": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert (r.json()["usage"]["completion_tokens"], choice["finish_reason"]) == (1, "length")


def test_405_404_health_and_openapi(app_client: TestClient) -> None:
    r = app_client.get("/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert_error(app_client.get("/nowhere"), 404)
    health = app_client.get("/health")
    assert health.headers["content-type"] == "application/json" and health.json() == {"status": "ok"}
    schema = app_client.get("/openapi.json").json()
    statuses = {s for ops in schema["paths"].values() for op in ops.values() for s in op["responses"]}
    assert "422" not in statuses and {"400", "404", "415", "429", "503"} <= statuses
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_sse_framing_survives_splitlines() -> None:
    text = "a\u2028b\x85c\u2029d\ne\rf"
    for event in (sse({"text": text}), sse_data(json.dumps({"text": text}, ensure_ascii=False))):
        line = event.decode()
        assert line.endswith("\n\n") and len(line[:-2].splitlines()) == 1
        assert json.loads(line[len("data: ") : -2]) == {"text": text}


def test_echoed_line_separators_stream_on_one_line(app_client: TestClient) -> None:
    body = {"prompt": "a\u2028b\u0085c", "echo": True, "max_tokens": 1, "stream": True}
    with app_client.stream("POST", "/v1/completions", json=body) as r:
        raw = r.read().decode()
    assert "\u2028" not in raw and "\x85" not in raw
    events = sse_events(raw.split("\n"))
    assert events[0]["choices"][0]["text"].startswith("a\u2028b\u0085c") and events[-1] == "[DONE]"


def test_allowed_hosts_and_cors(model_dir: Path) -> None:
    hosts = default_allowed_hosts("127.0.0.1")
    assert hosts is not None and "localhost" in hosts and default_allowed_hosts("0.0.0.0") is None
    server = ServerConfig(allowed_hosts=hosts, allowed_origins=("http://app.example",))
    with TestClient(make_app(model_dir, server=server), base_url="http://localhost:8000") as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models", headers={"host": "127.0.0.1:8000"}).status_code == 200
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
            assert assert_error(client.get("/v1/models", headers={"host": host}), 400)["code"] == "invalid_host"
        preflight = {"origin": "http://app.example", "access-control-request-method": "POST"}
        r = client.options("/v1/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = client.options("/v1/completions", headers={**preflight, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(make_app(model_dir)) as client:  # no --allowed-origins: no CORS headers at all
        r = client.get("/v1/models", headers={"origin": "http://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_fanout_cap_and_draining_refuse_with_the_right_status(model_dir: Path) -> None:
    """(Concurrency, 429 under load and the drain of running streams: tests/reliability.)"""
    server = ServerConfig(max_queued_requests=1, max_fanout=2)
    with TestClient(make_app(model_dir, max_num_seqs=2, server=server)) as client:
        assert client.app.state.admission.max_in_flight == 3  # 2 slots + 1 queued
        err = assert_error(client.post("/v1/completions", json={"prompt": "x", "n": 3}), 400, "n")
        assert err["code"] == "fanout_exceeded"
        err = assert_error(client.post("/v1/completions", json={"prompt": ["x", "y"], "n": 2}), 400, "n")
        assert client.post("/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 2}).status_code == 200
        client.app.state.admission.start_draining()
        drained = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert assert_error(drained, 503)["code"] == "server_shutting_down"
        assert drained.headers["retry-after"] and client.get("/health").status_code == 503
        assert client.app.state.admission.in_flight == 0


def test_request_timeout_ends_with_abort_and_frees_slots(model_dir: Path) -> None:
    with TestClient(make_app(model_dir, server=ServerConfig(request_timeout=0.5))) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "n": 2, **LONG})
        assert r.status_code == 200, r.text
        assert [c["finish_reason"] for c in r.json()["choices"]] == ["abort", "abort"]
        assert r.json()["usage"]["completion_tokens"] > 0
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "stream": True, **LONG},
        ) as s:
            events = sse_events(list(s.iter_lines()))
        assert events[-2]["choices"][0]["finish_reason"] == "abort" and events[-1] == "[DONE]"
        wait_idle(client)
        assert finished(client, "abort") == 3


def finished(client: TestClient, reason: str) -> float:
    prefix = f'vllm:request_success_total{{finished_reason="{reason}"'
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


def test_engine_errors_are_counted_as_error_not_abort() -> None:
    with TestClient(build_app(FailingEngine(), None, model_name="f", model_root="/f")) as client:
        assert_error(client.post("/v1/completions", json={"prompt": [1, 2], "n": 2}), 500)
        assert (finished(client, "error"), finished(client, "abort")) == (1, 1)  # the other choice was cut short
