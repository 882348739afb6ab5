"""``rnnserve bench chat`` against the real app (tiny random Mamba, NeoX tokenizer) on 127.0.0.1,
with and without the prefix cache: every turn completes with exact answer lengths, turn t resends
turns 1..t-1, the cache serves most of each later prompt and nothing without it; JSON and plot."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from rnnserve.bench import chat
from rnnserve.config import PrefixCacheConfig
from tests.bench.stub_openai import free_port
from tests.server.conftest import build_model_dir, make_app


@contextmanager
def live_app(model_dir: Path, cache: PrefixCacheConfig) -> Iterator[str]:
    port = free_port()
    app = make_app(model_dir, prefix_cache=cache, max_num_seqs=4)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_dir(neox_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("chatbench") / "tiny-mamba", neox_tokenizer_dir)


ARGS = ["--conversations", "3", "--turns", "3", "--user-len", "20", "--answer-len", "6", "--think-time", "0.01"]


def test_bench_chat_with_and_without_the_cache(model_dir: Path, tmp_path: Path, capsys) -> None:
    results = {}
    for enabled in (True, False):
        out = tmp_path / f"chat-{enabled}.json"
        with live_app(model_dir, PrefixCacheConfig(enabled=enabled)) as url:
            assert chat.main(["--base-url", url, *ARGS, "--json", str(out)]) == 0
        results[enabled] = json.loads(out.read_text())
    for s in results.values():
        assert s["completed"] == 9 and s["failed"] == 0
        assert s["total_output_tokens"] == 9 * 6
        turns = s["per_turn"]
        assert [t["completed"] for t in turns] == [3, 3, 3]
        # Each turn resends the conversation: prompts grow by a user message and an answer.
        assert turns[0]["mean_prompt_tokens"] < turns[1]["mean_prompt_tokens"] < turns[2]["mean_prompt_tokens"]
        assert all(t["mean_ttft_ms"] > 0 for t in turns)
    assert results[False]["cached_ratio_after_turn_1"] == 0.0
    # With the cache, the previous turns (all but the new message and the answer's re-tokenised end).
    assert results[True]["cached_ratio_after_turn_1"] > 0.4
    # First turns hold no history; they may only share the chat template's opening tokens, which
    # requests in flight together prefill once.
    assert results[True]["per_turn"][0]["cached_ratio"] < 0.2
    text = capsys.readouterr().out
    assert "Multi-turn Chat Benchmark" in text and "Cached prompt tokens, turns 2+:" in text
    pytest.importorskip("matplotlib")
    png = tmp_path / "ttft.png"
    chat.plot([("cache", results[True]), ("no cache", results[False])], png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_chat_unreachable_server_is_an_error(capsys) -> None:
    rc = chat.main(["--base-url", f"http://127.0.0.1:{free_port()}", *ARGS, "--timeout", "5"])
    assert rc == 2 and "cannot reach" in capsys.readouterr().err


def test_bench_chat_concurrency_bounds_conversations_in_flight() -> None:
    from tests.bench.stub_openai import stub_server

    with stub_server(token_delay_s=0.001) as stub:
        cfg = chat.ChatBenchConfig(base_url=stub.url, conversations=4, turns=3, user_len=3, answer_len=2, concurrency=1)
        summary = asyncio.run(chat.run_benchmark(cfg))
    assert summary["completed"] == 12 and summary["failed"] == 0
    # One conversation at a time: each conversation's turns arrive together (its first message names it).
    firsts = [r["messages"][0]["content"] for r in stub.requests if "messages" in r]
    runs = [firsts[i] for i in range(len(firsts)) if i == 0 or firsts[i] != firsts[i - 1]]
    assert len(firsts) == 12 and len(runs) == 4 and len(set(runs)) == 4, firsts
    with pytest.raises(ValueError, match="concurrency"):
        chat.ChatBenchConfig(base_url=stub.url, concurrency=0)
