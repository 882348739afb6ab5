"""``rnnserve bench serve`` against a live OpenAI-compatible server on 127.0.0.1 (the stub here;
tests/bench/test_serve_live.py runs it against ``rnnserve serve``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from rnnserve.bench import serve
from rnnserve.bench.serve import StreamError, sse_chunks
from tests.bench.stub_openai import free_port, stub_server

METRICS = ("ttft", "tpot", "itl", "e2el")


def check_summary(s: dict, n: int, output_len: int) -> None:
    """Every metric present and plausible for ``n`` requests of ``output_len`` tokens each."""
    assert s["completed"] == n and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == n * output_len  # from usage: ignore_eos made each run to max_tokens
    assert s["total_input_tokens"] > 0
    assert s["duration"] > 0
    assert s["request_throughput"] == pytest.approx(n / s["duration"])
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration"])
    assert s["total_token_throughput"] > s["output_throughput"]
    for m in METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{m}_ms" in s
        assert s[f"mean_{m}_ms"] > 0
        assert s[f"p99_{m}_ms"] >= s[f"median_{m}_ms"] > 0
    assert s["mean_e2el_ms"] > s["mean_ttft_ms"]
    assert len(s["ttfts"]) == len(s["itls"]) == len(s["output_lens"]) == n
    assert all(t > 0 for t in s["ttfts"])


def test_poisson_completions_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "res" / "bench.json"
    with stub_server(token_delay_s=0.004) as stub:
        rc = serve.main(
            [
                "--base-url",
                stub.url + "/v1",
                "--num-prompts",
                "8",
                "--input-len",
                "24",
                "--output-len",
                "6",
                "--request-rate",
                "40",
                "--seed",
                "1",
                "--json",
                str(out),
            ]
        )
    assert rc == 0
    s = json.loads(out.read_text())
    check_summary(s, 8, 6)
    assert s["model_id"] == "stub-model"  # from /v1/models
    assert s["usage_reported"] is True
    # /tokenize sized the prompts: the stub counts words, so exactly input-len each
    assert s["input_lens"] == [24] * 8
    assert s["request_rate"] == 40.0
    # streaming with usage and ignore_eos, exactly output-len tokens asked
    bodies = stub.requests
    assert len(bodies) == 8 and len({b["prompt"] for b in bodies}) == 8
    assert all(
        b["stream"] and b["ignore_eos"] and b["max_tokens"] == 6 and b["stream_options"] == {"include_usage": True}
        for b in bodies
    )
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Mean TTFT (ms):" in printed


def test_chat_fixed_concurrency() -> None:
    import asyncio

    with stub_server(token_delay_s=0.002) as stub:
        cfg = serve.ServeBenchConfig(
            base_url=stub.url, endpoint="chat", num_prompts=6, input_len=10, output_len=5, max_concurrency=2
        )
        s = asyncio.run(serve.run_benchmark(cfg))
    check_summary(s, 6, 5)
    assert s["max_concurrency"] == 2 and s["request_rate"] == "inf"
    assert all(b["messages"][0]["role"] == "user" for b in stub.requests)


def test_failures_are_counted_not_fatal(tmp_path: Path) -> None:
    out = tmp_path / "fail.json"
    with stub_server() as stub:
        rc = serve.main(
            ["--base-url", stub.url, "--model", "nope", "--num-prompts", "3", "--output-len", "2", "--json", str(out)]
        )
    s = json.loads(out.read_text())
    assert rc == 1
    assert s["completed"] == 0 and s["failed"] == 3
    assert all(e.startswith("HTTP 404") for e in s["errors"])


def test_unreachable_server_is_a_clear_error(capsys) -> None:
    rc = serve.main(["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1"])
    assert rc == 2
    assert "cannot reach" in capsys.readouterr().err


def test_percentile_interpolates_like_numpy() -> None:
    assert serve._percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert serve._percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert serve._percentile([], 99) == 0.0
    assert serve.api_root("http://h:1/v1/") == "http://h:1"


def test_sse_chunks_yields_events_until_done_and_raises_on_errors() -> None:
    bodies = {
        "/ok": (200, 'data: {"a": 1}\n\n: comment\n\ndata: {"a": 2}\n\ndata: [DONE]\n\ndata: {"a": 3}\n\n'),
        "/event": (200, 'data: {"a": 1}\n\ndata: {"error": {"message": "engine failed"}}\n\n'),
        "/status": (503, '{"error": "busy"}'),
    }

    def answer(request: httpx.Request) -> httpx.Response:
        status, text = bodies[request.url.path]
        return httpx.Response(status, text=text)

    async def read(path: str) -> list[dict]:
        got: list[dict] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://stub") as client:
            async for chunk in sse_chunks(client, path, {}):
                got.append(chunk)
        return got

    assert asyncio.run(read("/ok")) == [{"a": 1}, {"a": 2}]
    with pytest.raises(StreamError, match="engine failed"):
        asyncio.run(read("/event"))
    with pytest.raises(StreamError, match="HTTP 503"):
        asyncio.run(read("/status"))
