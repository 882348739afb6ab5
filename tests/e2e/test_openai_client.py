"""The official ``openai`` client against a live ``rnnserve serve`` (tiny random Mamba, real engine)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import API_KEY, MODEL_NAME, REPO, LiveServer

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def metric(server: LiveServer, name: str, **labels: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def wait_for(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_startup_line_and_models(live_server: LiveServer, client: openai.OpenAI) -> None:
    assert f"{live_server.base_url}/v1" in live_server.log_text()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    extra = models[0].model_extra or {}
    assert extra["root"] and "max_model_len" in extra and models[0].owned_by == "rnnserve"


def test_completion_n_and_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="The weather today", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 8
    seeded = dict(model=MODEL_NAME, prompt="The weather today", max_tokens=8, temperature=1.0, seed=7, n=2)
    a, b = client.completions.create(**seeded), client.completions.create(**seeded)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert [c.index for c in a.choices] == [0, 1]


def test_chat_and_streaming_with_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text
    stream = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, temperature=0, stream=True)
    assert sum(1 for c in stream for _ in c.choices if _.text is not None) >= 1


def test_stop_strings_and_logprobs(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL_NAME, prompt="Long ago", max_tokens=20, temperature=0, logprobs=2)
    lp = base.choices[0].logprobs
    assert len(lp.tokens) == 20 and all(len(t) >= 2 for t in lp.top_logprobs)
    text = base.choices[0].text
    # A stop string spanning the boundary between the 3rd and 4th non-trivial tokens.
    pos = sum(len(t) for t in lp.tokens[:3])
    stop = text[pos - 1 : pos + 1]
    expected = text[: text.find(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt="Long ago", max_tokens=20, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_NAME, prompt="Long ago", max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == expected
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 for e in content)


def test_errors(live_server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4, temperature=-3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    bad_key = openai.OpenAI(base_url=live_server.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(live_server.v1 + "/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL_NAME, prompt="word " * 20000, max_tokens=1)
    assert info.value.status_code == 413
    assert httpx.get(live_server.base_url + "/health", timeout=5).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(live_server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": "Go on forever", "max_tokens": 100000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", live_server.v1 + "/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break
        assert metric(live_server, "vllm:num_requests_running") == 1
        assert metric(live_server, "rnnserve:state_pool_usage") > 0
    # Leaving the block closed the connection mid-stream.
    assert wait_for(lambda: metric(live_server, "vllm:num_requests_running") == 0)
    assert wait_for(lambda: metric(live_server, "rnnserve:state_pool_usage") == 0)
    assert metric(live_server, "vllm:request_success_total", finished_reason="abort") >= 1


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(live_server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": "Go on", "max_tokens": 100000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.v1 + "/completions", json=body, headers=headers, timeout=httpx.Timeout(1.5, connect=5))
    assert wait_for(lambda: metric(live_server, "vllm:num_requests_running") == 0)
    assert wait_for(lambda: metric(live_server, "rnnserve:state_pool_usage") == 0)


def test_many_clients_leaving_and_stopping_leak_no_slot(live_server: LiveServer) -> None:
    """12 concurrent streams on 4 slots (so most wait for one first): a third leave after their first
    chunk, a third stop on a stop string, the rest finish; afterwards nothing runs or waits."""
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"model": MODEL_NAME, "prompt": f"Client {i} says", "stream": True, "temperature": 1.0, "seed": i}
        if i % 3 == 0:
            body.update(max_tokens=100000, ignore_eos=True)  # leaves after its first chunk
        elif i % 3 == 1:
            body.update(max_tokens=64, stop=["e", "a"])  # almost surely stops early
        else:
            body.update(max_tokens=8)
        async with http.stream("POST", live_server.v1 + "/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if i % 3 == 0 and line.startswith("data: {"):
                    return "left"
                if line == "data: [DONE]":
                    return "done"
        return "eof"

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(12)))

    results = asyncio.run(run())
    assert results == ["left" if i % 3 == 0 else "done" for i in range(12)]
    assert wait_for(lambda: metric(live_server, "vllm:num_requests_running") == 0)
    assert metric(live_server, "vllm:num_requests_waiting") == 0
    assert metric(live_server, "rnnserve:state_pool_usage") == 0


def test_metrics_after_traffic(live_server: LiveServer) -> None:
    text = httpx.get(live_server.base_url + "/metrics", timeout=5).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "rnnserve:state_pool_usage",
        "rnnserve:state_bytes_per_slot",
        "rnnserve:state_pool_slots",
        "rnnserve:engine_step_seconds",
    ):
        assert f'{name}{{model_name="{MODEL_NAME}"' in text or f"{name}{{" in text, name
    assert metric(live_server, "vllm:generation_tokens_total") > 0


def test_complete_command(live_server: LiveServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rnnserve", "complete", "--base-url", live_server.v1, "--api-key", API_KEY,
         "--max-tokens", "5", "Hello"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
