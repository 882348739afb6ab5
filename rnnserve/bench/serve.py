"""``rnnserve bench serve``: an open-loop load generator for any OpenAI-compatible server.

Sends ``--num-prompts`` streaming requests of synthetic prompts (random words sized to about
``--input-len`` tokens, through the server's ``/tokenize`` when it has one) asking for exactly
``--output-len`` tokens (``ignore_eos``), either arriving as a Poisson process at ``--request-rate``
or kept at a fixed ``--max-concurrency``, and reports what ``vllm bench serve`` reports: request
throughput, output and total tokens/s, and TTFT, TPOT, ITL and end-to-end latency (mean, median,
p99). Token counts come from the stream's ``usage`` (``stream_options.include_usage``).

Only httpx is needed (no torch), so it runs against ours, vLLM's or llama.cpp's server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from rnnserve.console import ArgumentParser, api_key_from_env, error_message, print_error

# Common short English words: each is one token in BPE vocabularies, so word count ~ token count.
_WORD_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find any new work part take get "
    "place made live where after back little only round man year came show every good me give our "
    "under name very through just form sentence great think say help low line differ turn cause much "
    "mean before move right boy old too same tell does set three want air well also play small end "
    "put home read hand port large spell add even land here must big high such follow act why ask"
)
_WORDS = tuple(_WORD_TEXT.split())

PERCENTILES = (50, 90, 99)


class BenchError(RuntimeError):
    """The benchmark could not run (server unreachable, no model...)."""


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str
    model: str | None = None
    endpoint: str = "completions"  # "completions" | "chat"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf = all at once
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, not {self.endpoint!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf for all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds)."""

    success: bool = False
    prompt_len: int = 0  # from usage, else the requested input length
    output_len: int = 0  # from usage, else the number of content chunks
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    latency: float = 0.0
    usage_reported: bool = False
    error: str = ""


def api_root(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all name the same server."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model_id(client: httpx.AsyncClient, root: str) -> str:
    resp = await client.get(f"{root}/v1/models")
    if resp.status_code != 200:  # a wrong API key is no unreachable server: say what the server said
        raise BenchError(f"GET {root}/v1/models: HTTP {resp.status_code}: {error_message(resp.text)}")
    data = resp.json().get("data") or []
    if not data:
        raise BenchError(f"{root}/v1/models lists no model; pass --model")
    return data[0]["id"]


async def count_tokens(client: httpx.AsyncClient, root: str, model: str, text: str) -> int | None:
    """Token count from the server's ``/tokenize`` (vLLM and llama.cpp shapes), None without one."""
    try:
        resp = await client.post(f"{root}/tokenize", json={"model": model, "prompt": text, "content": text})
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    body = resp.json()
    if isinstance(body.get("count"), int):
        return body["count"]
    if isinstance(body.get("tokens"), list):
        return len(body["tokens"])
    return None


async def make_prompts(client: httpx.AsyncClient, root: str, cfg: ServeBenchConfig, model: str) -> list[str]:
    """``num_prompts`` random-word prompts of about ``input_len`` tokens each (all different, so no
    prefix cache helps). Calibrated with one ``/tokenize`` call when the server has it."""
    rng = random.Random(cfg.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))

    n_words = cfg.input_len
    counted = await count_tokens(client, root, model, words(n_words))
    if counted:
        n_words = max(1, round(cfg.input_len * n_words / counted))
    return [words(n_words) for _ in range(cfg.num_prompts)]


def _payload(cfg: ServeBenchConfig, model: str, prompt: str) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": cfg.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(chunk: dict) -> str:
    out = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            out.append(delta.get("content") or delta.get("reasoning_content") or "")
        else:
            out.append(choice.get("text") or "")
    return "".join(out)


class StreamError(Exception):
    """The server answered a streamed request with an error status or an error event."""


async def sse_chunks(client: httpx.AsyncClient, url: str, body: dict) -> AsyncIterator[dict]:
    """POST ``body`` and yield each server-sent event's JSON until ``[DONE]``. Raises StreamError
    (its message cut to 300 characters) for a status other than 200 or an ``error`` event."""
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise StreamError(f"HTTP {resp.status_code}: {text[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise StreamError(str(chunk["error"])[:300])
            yield chunk


async def send_request(client: httpx.AsyncClient, url: str, body: dict, input_len: int) -> RequestResult:
    """Stream one request and time it: TTFT at the first chunk with text, ITL between chunks."""
    result = RequestResult(prompt_len=input_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with aclosing(sse_chunks(client, url, body)) as stream:
            async for chunk in stream:
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.usage_reported = True
                    result.output_len = int(usage.get("completion_tokens") or 0)
                    result.prompt_len = int(usage.get("prompt_tokens") or input_len)
    except StreamError as exc:
        result.error = str(exc)
        return result
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    if not result.usage_reported:
        result.output_len = chunks
    if chunks == 0:
        result.error = "the stream carried no text"
        return result
    result.success = True
    return result


async def _arrivals(n: int, rate: float, rng: random.Random):
    """Yield 0..n-1 spaced by exponential gaps (a Poisson process of ``rate`` per second)."""
    for i in range(n):
        yield i
        if math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run_benchmark(cfg: ServeBenchConfig) -> dict:
    """Run the whole benchmark; returns the result dict that ``--json`` writes."""
    root = api_root(cfg.base_url)
    limits = httpx.Limits(max_connections=cfg.max_concurrency or cfg.num_prompts, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=_headers(cfg.api_key)) as client:
        try:
            model = cfg.model or await fetch_model_id(client, root)
        except httpx.HTTPError as exc:
            raise BenchError(f"cannot reach {root}: {type(exc).__name__}: {exc}") from exc
        prompts = await make_prompts(client, root, cfg, model)
        url = f"{root}/v1/chat/completions" if cfg.endpoint == "chat" else f"{root}/v1/completions"
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def one(prompt: str) -> RequestResult:
            if sem is None:
                return await send_request(client, url, _payload(cfg, model, prompt), cfg.input_len)
            async with sem:
                return await send_request(client, url, _payload(cfg, model, prompt), cfg.input_len)

        rng = random.Random(cfg.seed + 1)
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(prompts[i])) async for i in _arrivals(cfg.num_prompts, cfg.request_rate, rng)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(cfg, model, results, duration)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = _percentile(ms, p)
    return out


def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(cfg: ServeBenchConfig, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    # TPOT excludes the first token: (E2E - TTFT) / (output tokens - 1), per request.
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    summary: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_url": api_root(cfg.base_url),
        "endpoint": cfg.endpoint,
        "model_id": model,
        "num_prompts": cfg.num_prompts,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "max_concurrency": cfg.max_concurrency,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    summary |= _stats("ttft", [r.ttft for r in ok])
    summary |= _stats("tpot", tpots)
    summary |= _stats("itl", [x for r in ok for x in r.itl])
    summary |= _stats("e2el", [r.latency for r in ok])
    summary |= {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "e2els": [r.latency for r in results],
        "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
    }
    return summary


def format_summary(s: dict) -> str:
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: object) -> None:
        text = f"{value:<.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<45}{text:>15}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Maximum request concurrency:", s["max_concurrency"] or "none")
    row("Request rate (req/s):", s["request_rate"])
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        row(f"Mean {key.upper()} (ms):", s[f"mean_{key}_ms"])
        row(f"Median {key.upper()} (ms):", s[f"median_{key}_ms"])
        row(f"P99 {key.upper()} (ms):", s[f"p99_{key}_ms"])
    if not s["usage_reported"] and s["completed"]:
        lines.append("note: the server sent no usage; output tokens were counted as stream chunks")
    errors = sorted({e for e in s["errors"] if e})
    for e in errors[:5]:
        lines.append(f"error: {e}")
    lines.append("=" * 60)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rnnserve bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a /v1 suffix is fine)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens (approximate)")
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrival rate, req/s (default inf)")
    p.add_argument(
        "--max-concurrency", type=int, default=None, help="at most this many requests in flight (with a rate: a cap)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    p.add_argument("--api-key", default=None, help="default: $RNNSERVE_API_KEY, else $OPENAI_API_KEY")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json", type=Path, default=None, help="write the full result (per-request lists too) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = ServeBenchConfig(
            base_url=args.base_url,
            model=args.model,
            endpoint=args.endpoint,
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            api_key=args.api_key or api_key_from_env(),
            timeout_s=args.timeout,
        )
        summary = asyncio.run(run_benchmark(cfg))
    except (ValueError, BenchError) as exc:
        print_error(str(exc))
        return 2
    print(format_summary(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
