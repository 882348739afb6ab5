"""The prefix cache through the HTTP API: ``usage.prompt_tokens_details.cached_tokens`` on chat and
completions (streamed usage chunk too), the vLLM prefix-cache counters and our snapshot series,
``n > 1`` prefilled once, and named initial states (``initial_state``, ``POST /v1/states``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.config import PrefixCacheConfig, ServerConfig
from tests.server.conftest import make_app

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from fastapi.testclient import TestClient

    states = tmp_path_factory.mktemp("states")
    app = make_app(
        model_dir,
        prefix_cache=PrefixCacheConfig(interval=32),
        state_dir=str(states),
        server=ServerConfig(api_key="k"),
    )
    with TestClient(app, headers={"Authorization": "Bearer k"}) as c:
        yield c


def metrics(client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(client, name: str) -> float:
    return next(v for k, v in metrics(client).items() if k.startswith(name + "{") or k == name)


def test_chat_turn_two_is_served_from_the_cache(client) -> None:
    messages = [{"role": "user", "content": "Tell me a story about a recurrent network that remembers."}]
    first = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, **GREEDY}).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    queries, hits = metric(client, "vllm:prefix_cache_queries_total"), metric(client, "vllm:prefix_cache_hits_total")
    messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    body = {"messages": messages, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    usage = events[-1]["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    # The whole first exchange up to the answer's last token is reused (the chat template may
    # re-tokenise the answer's end, so at least the first prompt).
    assert first["usage"]["prompt_tokens"] <= cached < usage["prompt_tokens"]
    assert metric(client, "vllm:prefix_cache_hits_total") - hits == cached
    assert metric(client, "vllm:prefix_cache_queries_total") - queries == usage["prompt_tokens"]
    m = metrics(client)
    assert m['rnnserve:prefix_cache_bytes{model_name="tiny-mamba",tier="device"}'] > 0
    assert metric(client, "rnnserve:prefix_cache_entries") >= 2
    assert metric(client, "rnnserve:prefix_cache_evictions_total") == 0


def test_completions_report_cached_tokens_streamed_and_not(client) -> None:
    prompt = list(range(100, 180))
    client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, **GREEDY})
    r = client.post("/v1/completions", json={"prompt": [*prompt, 7, 8], "max_tokens": 2, **GREEDY}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
    body = {"prompt": [*prompt, 9], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json={**body, **GREEDY}) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)


def test_n_4_prefills_the_prompt_once(client) -> None:
    prompt = list(range(300, 340))
    before = metric(client, "vllm:prompt_tokens_total")
    body = {"prompt": prompt, "max_tokens": 5, "n": 4, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "return_token_ids": True}).json()
    assert len(r["choices"]) == 4 and r["usage"]["prompt_tokens"] == len(prompt)
    assert metric(client, "vllm:prompt_tokens_total") - before == len(prompt)
    # Choice i equals a single request seeded with seed + i.
    for i, choice in enumerate(r["choices"]):
        alone = {**body, "n": 1, "seed": 3 + i, "return_token_ids": True}
        assert client.post("/v1/completions", json=alone).json()["choices"][0]["token_ids"] == choice["token_ids"]


def test_saved_states_start_requests(client) -> None:
    persona = list(range(500, 530))
    question = [11, 12, 13]
    assert (
        client.post(
            "/v1/states", json={"name": "persona", "prompt": persona}, headers={"Authorization": ""}
        ).status_code
        == 401
    )
    r = client.post("/v1/states", json={"name": "persona", "prompt": persona})
    assert r.status_code == 200 and r.json()["num_tokens"] == len(persona)
    assert {"object": "state", "name": "persona"} in client.get("/v1/states").json()["data"]
    body = {"prompt": question, "max_tokens": 6, "return_token_ids": True, **GREEDY}
    from_state = client.post("/v1/completions", json={**body, "initial_state": "persona"}).json()
    with_prompt = client.post("/v1/completions", json={**body, "prompt": persona + question}).json()
    assert from_state["choices"][0]["token_ids"] == with_prompt["choices"][0]["token_ids"]
    unknown = client.post("/v1/completions", json={**body, "initial_state": "nobody"})
    assert unknown.status_code == 400 and "no state named" in unknown.json()["error"]["message"]
    bad_name = client.post("/v1/states", json={"name": "../x", "prompt": persona})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
