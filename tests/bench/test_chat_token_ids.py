"""``rnnserve bench chat --token-ids``: each conversation is one growing prompt of token ids, so every
server sees the same prompts and a resent answer is exactly the generated ids. Against the real app
(tiny random Mamba, NeoX tokenizer) the cache resumes every later turn at the end of the previous
answer; against a fake of llama.cpp's ``/completion`` (``--api llamacpp``), the ids and the cached
counts come from its ``tokens`` and ``timings``."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request

from rnnserve.bench import chat
from rnnserve.config import PrefixCacheConfig
from tests.bench.stub_openai import free_port
from tests.bench.test_chat import live_app
from tests.server.conftest import build_model_dir

USER, ANSWER, TURNS, CONVERSATIONS = 12, 5, 3, 2


@pytest.fixture(scope="module")
def model_dir(neox_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("chatids") / "tiny-mamba", neox_tokenizer_dir)


def _config(url: str, **kw: object) -> chat.ChatBenchConfig:
    return chat.ChatBenchConfig(
        base_url=url,
        conversations=CONVERSATIONS,
        turns=TURNS,
        user_len=USER,
        answer_len=ANSWER,
        token_ids=True,
        timeout_s=120,
        **kw,  # type: ignore[arg-type]
    )


def test_token_ids_resume_at_the_end_of_each_answer(model_dir: Path) -> None:
    summaries = {}
    for enabled in (True, False):
        with live_app(model_dir, PrefixCacheConfig(enabled=enabled)) as url:
            summaries[enabled] = asyncio.run(chat.run_benchmark(_config(url)))
    for s in summaries.values():
        assert s["completed"] == CONVERSATIONS * TURNS and s["failed"] == 0, s["requests"]
        for r in s["requests"]:
            # Exact lengths: t user messages and t - 1 answers, no template, no re-tokenised text.
            assert r["prompt_tokens"] == r["turn"] * USER + (r["turn"] - 1) * ANSWER
            assert r["completion_tokens"] == ANSWER
    # The same seed and tokenizer give both servers the same user messages.
    assert summaries[True]["user_messages_sha256"] == summaries[False]["user_messages_sha256"]
    assert all(r["cached_tokens"] == 0 for r in summaries[False]["requests"])
    for r in summaries[True]["requests"]:
        if r["turn"] > 1:
            # The previous prompt and every answer token but the last, which was sampled, never fed.
            previous = (r["turn"] - 1) * USER + (r["turn"] - 2) * ANSWER
            assert r["cached_tokens"] == previous + ANSWER - 1, r


class FakeLlamaServer:
    """llama.cpp's ``/completion`` as the bench uses it: a prompt of ids, ``tokens`` back unstreamed,
    ``timings`` with cache_n (the longest prefix of the prompt it had fed before) and prompt_n."""

    def __init__(self, short_answers: bool = False) -> None:
        self.prompts: list[list[int]] = []
        self.fed: list[list[int]] = []  # per request, what a slot held afterwards: prompt + answer[:-1]
        self.short_answers = short_answers

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": "fake.gguf", "object": "model"}]}

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict:
            words = str((await request.json())["content"]).split()
            return {"tokens": [1000 + len(w) * 7 + ord(w[0]) for w in words]}

        @app.post("/completion")
        async def completion(request: Request) -> dict:
            body = await request.json()
            assert body["stream"] is False and body["return_tokens"] and body["cache_prompt"] and body["ignore_eos"]
            prompt = [int(i) for i in body["prompt"]]
            cache_n = max((_common_prefix(prompt, f) for f in self.fed), default=0)
            n = body["max_tokens"] - (1 if self.short_answers else 0)
            tokens = [(sum(prompt) + i) % 50000 for i in range(n)]
            self.prompts.append(prompt)
            self.fed.append(prompt + tokens[:-1])
            await asyncio.sleep(0.05)  # "generation", reported as predicted_ms
            timings = {"cache_n": cache_n, "prompt_n": len(prompt) - cache_n, "predicted_n": n, "predicted_ms": 50.0}
            return {"content": "", "tokens": tokens, "stop": True, "timings": timings}

        return app


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@contextmanager
def fake_llama_server(fake: FakeLlamaServer) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_llamacpp_api_resends_the_returned_ids_and_reads_timings(tmp_path: Path, capsys) -> None:
    fake = FakeLlamaServer()
    out = tmp_path / "llama.json"
    with fake_llama_server(fake) as url:
        args = ["--base-url", url, "--token-ids", "--api", "llamacpp", "--conversations", str(CONVERSATIONS)]
        args += ["--turns", str(TURNS), "--user-len", str(USER), "--answer-len", str(ANSWER), "--json", str(out)]
        assert chat.main([*args, "--progress"]) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == CONVERSATIONS * TURNS and s["failed"] == 0
    # Each conversation's next prompt is its previous prompt, the ids returned for it and a new message.
    by_first = {}
    for prompt in fake.prompts:
        by_first.setdefault(tuple(prompt[:USER]), []).append(prompt)
    assert len(by_first) == CONVERSATIONS
    for prompts in by_first.values():
        assert [len(p) for p in prompts] == [t * USER + (t - 1) * ANSWER for t in range(1, TURNS + 1)]
        for before, after in itertools.pairwise(prompts):
            answer = [(sum(before) + i) % 50000 for i in range(ANSWER)]
            assert after[: len(before) + ANSWER] == before + answer
    for r in s["requests"]:
        expected = 0 if r["turn"] == 1 else (r["turn"] - 1) * USER + (r["turn"] - 2) * ANSWER + ANSWER - 1
        assert r["cached_tokens"] == expected and r["prompt_tokens"] == r["turn"] * USER + (r["turn"] - 1) * ANSWER
        # TTFT is the latency less the reported generation time.
        assert r["ttft"] == pytest.approx(r["latency"] - 0.05, abs=1e-6)
    err = capsys.readouterr().err
    assert "conversation 0 turn 3:" in err


def test_a_server_that_returns_too_few_ids_fails_the_conversation() -> None:
    with fake_llama_server(FakeLlamaServer(short_answers=True)) as url:
        s = asyncio.run(chat.run_benchmark(_config(url, api="llamacpp")))
    # Each conversation stops at its first turn: its next prompt would not be the same conversation.
    assert s["completed"] == 0 and s["failed"] == CONVERSATIONS
    assert all("returned 4 answer token ids, not 5" in r["error"] for r in s["requests"])


def test_llamacpp_api_needs_token_ids() -> None:
    with pytest.raises(ValueError, match="needs --token-ids"):
        chat.ChatBenchConfig(base_url="http://127.0.0.1:1", api="llamacpp")
    with pytest.raises(ValueError, match="openai or llamacpp"):
        chat.ChatBenchConfig(base_url="http://127.0.0.1:1", token_ids=True, api="vllm")
