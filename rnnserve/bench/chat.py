"""``rnnserve bench chat``: a multi-turn chat benchmark for any OpenAI-compatible server.

``--conversations`` conversations, each ``--turns`` turns long, run at once (or at most
``--concurrency`` of them at a time: a conversation starts when one ends). A turn sends the whole
conversation so far (as a chat client does) plus a new user message of about ``--user-len`` tokens
of random words, streams an answer of exactly ``--answer-len`` tokens (``ignore_eos``), keeps the
answer's text in the history and waits ``--think-time`` seconds before the next turn. Reported per
turn: TTFT (mean, median, p90), prompt tokens and the share of them the server says it served from
its prefix cache (``usage.prompt_tokens_details.cached_tokens``, as OpenAI and vLLM report it);
overall: duration, output and total token throughput, and the cached-token ratio from turn 2 on.
``--json`` writes everything (per request too), ``--plot`` draws TTFT against turn (matplotlib,
``pip install rnnserve[loadtest]``).

``--token-ids`` sends token ids instead of text, so every server sees the same prompts and a
resent answer is exactly the ids that were generated (text that is tokenized again need not be:
a random-weight model's answers are not). Each conversation is one growing prompt on the
completions endpoint: user messages of exactly ``--user-len`` ids, drawn with the seed from the ids
the server's ``/tokenize`` gives the word list, and each answer's ids as returned. ``--api openai``
(default) streams ``/v1/completions`` with vLLM's ``return_token_ids`` (rnnserve, vLLM);
``--api llamacpp`` posts to llama.cpp's own ``/completion`` with ``return_tokens`` and
``cache_prompt``, unstreamed because its stream drops the id of a token that ends inside a UTF-8
character: TTFT is then the latency less the generation time it reports (``timings.predicted_ms``,
first token to last), and cached tokens are its ``timings.cache_n`` of ``cache_n + prompt_n``.

Only httpx is needed (no torch), so it runs against ours, vLLM's or llama.cpp's server.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import sys
import time
from contextlib import aclosing
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from rnnserve.bench.serve import (
    _WORDS,
    BenchError,
    StreamError,
    _chunk_text,
    _headers,
    _percentile,
    api_root,
    count_tokens,
    fetch_model_id,
    sse_chunks,
)
from rnnserve.console import ArgumentParser, api_key_from_env, print_error


@dataclass(frozen=True)
class ChatBenchConfig:
    base_url: str
    model: str | None = None
    conversations: int = 8
    turns: int = 10
    user_len: int = 200  # tokens per user message (approximate, calibrated with /tokenize)
    answer_len: int = 128  # tokens per answer (exact with ignore_eos)
    think_time: float = 0.0  # seconds between an answer and the next user message
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    concurrency: int | None = None  # conversations in flight at once (None: all of them)
    token_ids: bool = False  # one growing prompt of token ids on the completions endpoint (see above)
    api: str = "openai"  # with token_ids: "openai" (/v1/completions) or "llamacpp" (/completion)
    progress: bool = False  # a line on stderr per finished turn (a long run's figures so far)

    def __post_init__(self) -> None:
        if min(self.conversations, self.turns, self.user_len, self.answer_len) < 1:
            raise ValueError("conversations, turns, user_len and answer_len must be >= 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.think_time < 0:
            raise ValueError("think_time must be >= 0")
        if self.api not in ("openai", "llamacpp"):
            raise ValueError(f"api must be openai or llamacpp, not {self.api!r}")
        if self.api == "llamacpp" and not self.token_ids:
            raise ValueError("--api llamacpp needs --token-ids")


@dataclass
class TurnResult:
    conversation: int
    turn: int  # 1-based
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # None: the server did not report it
    error: str = ""


def _read_usage(usage: dict, result: TurnResult) -> None:
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        result.cached_tokens = int(details["cached_tokens"])


async def _turn(client: httpx.AsyncClient, url: str, body: dict, result: TurnResult) -> str:
    """Stream one turn; returns the answer's text (empty on failure, with result.error set)."""
    start = time.perf_counter()
    text: list[str] = []
    try:
        async with aclosing(sse_chunks(client, url, body)) as stream:
            async for chunk in stream:
                piece = _chunk_text(chunk)
                if piece:
                    if not text:
                        result.ttft = time.perf_counter() - start
                    text.append(piece)
                if chunk.get("usage"):
                    _read_usage(chunk["usage"], result)
    except StreamError as exc:
        result.error = str(exc)
        return ""
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return ""
    result.latency = time.perf_counter() - start
    if not text:
        result.error = "the stream carried no text"
        return ""
    result.success = True
    return "".join(text)


async def _turn_ids_openai(client: httpx.AsyncClient, url: str, body: dict, result: TurnResult) -> list[int]:
    """Stream one turn of ``--token-ids`` from /v1/completions; returns the answer's ids (vLLM's
    ``choices[].token_ids``), empty on failure with result.error set. TTFT: the first chunk with
    text or ids (a token that ends inside a UTF-8 character has ids but no text yet)."""
    start = time.perf_counter()
    ids: list[int] = []
    first = True
    try:
        async with aclosing(sse_chunks(client, url, body)) as stream:
            async for chunk in stream:
                new = [int(i) for c in chunk.get("choices") or [] for i in (c.get("token_ids") or [])]
                if first and (new or _chunk_text(chunk)):
                    result.ttft = time.perf_counter() - start
                    first = False
                ids += new
                if chunk.get("usage"):
                    _read_usage(chunk["usage"], result)
    except StreamError as exc:
        result.error = str(exc)
        return []
    except (httpx.HTTPError, json.JSONDecodeError, TypeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return []
    result.latency = time.perf_counter() - start
    return ids


async def _turn_ids_llamacpp(client: httpx.AsyncClient, url: str, body: dict, result: TurnResult) -> list[int]:
    """One unstreamed turn of ``--token-ids`` on llama.cpp's /completion; returns ``tokens``. TTFT is
    the latency less ``timings.predicted_ms`` (llama-server's time from the first token to the last)."""
    start = time.perf_counter()
    try:
        resp = await client.post(url, json=body)
        result.latency = time.perf_counter() - start
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
            return []
        out = resp.json()
        timings = out["timings"]
        ids = [int(i) for i in out["tokens"]]
        result.ttft = max(0.0, result.latency - float(timings["predicted_ms"]) / 1000.0)
        result.cached_tokens = int(timings["cache_n"])
        result.prompt_tokens = result.cached_tokens + int(timings["prompt_n"])
        result.completion_tokens = int(timings.get("predicted_n") or len(ids))
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return []
    return ids


async def _word_ids(client: httpx.AsyncClient, root: str, model: str) -> list[int]:
    """The distinct ids of the word list as the server tokenizes it (vLLM's and llama.cpp's /tokenize)."""
    text = " " + " ".join(_WORDS)
    try:
        resp = await client.post(f"{root}/tokenize", json={"model": model, "prompt": text, "content": text})
        tokens = resp.json().get("tokens") if resp.status_code == 200 else None
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        raise BenchError(f"--token-ids needs the server's /tokenize: {type(exc).__name__}: {exc}") from exc
    if not isinstance(tokens, list) or not tokens:
        raise BenchError(f"--token-ids needs the server's /tokenize (POST {root}/tokenize gave no tokens)")
    # llama.cpp may answer {"id": ..., "piece": ...} objects (with_pieces); plain ints otherwise.
    return sorted({int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens})


def _print_progress(r: TurnResult) -> None:
    what = f"TTFT {r.ttft * 1000:.0f} ms, {r.cached_tokens}/{r.prompt_tokens} cached" if r.success else r.error
    print(f"conversation {r.conversation} turn {r.turn}: {what}", file=sys.stderr, flush=True)


async def _conversation_ids(
    cfg: ChatBenchConfig,
    client: httpx.AsyncClient,
    root: str,
    model: str,
    c: int,
    user_messages: list[list[int]],
    results: list[TurnResult],
) -> None:
    """One ``--token-ids`` conversation: a prompt that grows by each user message and each answer's ids."""
    url = f"{root}/completion" if cfg.api == "llamacpp" else f"{root}/v1/completions"
    turn = _turn_ids_llamacpp if cfg.api == "llamacpp" else _turn_ids_openai
    history: list[int] = []
    for t in range(cfg.turns):
        history += user_messages[t]
        body = {
            "model": model,
            "prompt": list(history),
            "max_tokens": cfg.answer_len,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        if cfg.api == "llamacpp":
            body |= {"stream": False, "return_tokens": True, "cache_prompt": True}
        else:
            body |= {"stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        result = TurnResult(conversation=c, turn=t + 1)
        answer = await turn(client, url, body, result)
        if not result.error and len(answer) != cfg.answer_len:
            result.error = (
                f"the server returned {len(answer)} answer token ids, not {cfg.answer_len} "
                "(--token-ids needs vLLM's return_token_ids, or --api llamacpp for llama-server)"
            )
        result.success = not result.error
        results.append(result)
        if cfg.progress:
            _print_progress(result)
        if not result.success:
            return  # the rest of this conversation would not be the same conversation
        history += answer
        if cfg.think_time and t < cfg.turns - 1:
            await asyncio.sleep(cfg.think_time)


async def run_benchmark(cfg: ChatBenchConfig) -> dict:
    """Run every conversation; returns the result dict that ``--json`` writes."""
    root = api_root(cfg.base_url)
    in_flight = min(cfg.conversations, cfg.concurrency or cfg.conversations)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=_headers(cfg.api_key)) as client:
        try:
            model = cfg.model or await fetch_model_id(client, root)
        except httpx.HTTPError as exc:
            raise BenchError(f"cannot reach {root}: {type(exc).__name__}: {exc}") from exc
        rng = random.Random(cfg.seed)

        def words(n: int) -> str:
            return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))

        results: list[TurnResult] = []
        slots = asyncio.Semaphore(in_flight)
        # All user messages drawn up front, so a run's requests depend on the seed only.
        messages: list[list[str]] = []
        id_messages: list[list[list[int]]] = []
        if cfg.token_ids:
            pool = await _word_ids(client, root, model)
            # Drawn up front from the seed and the tokenizer only, so servers sharing a tokenizer see
            # the same user messages (the summary's user_messages_sha256 shows it).
            id_messages = [
                [[rng.choice(pool) for _ in range(cfg.user_len)] for _ in range(cfg.turns)]
                for _ in range(cfg.conversations)
            ]
        else:
            n_words = cfg.user_len
            counted = await count_tokens(client, root, model, words(n_words))
            if counted:
                n_words = max(1, round(cfg.user_len * n_words / counted))
            messages = [[words(n_words) for _ in range(cfg.turns)] for _ in range(cfg.conversations)]
        url = f"{root}/v1/chat/completions"

        async def conversation(c: int) -> None:
            async with slots:
                if cfg.token_ids:
                    await _conversation_ids(cfg, client, root, model, c, id_messages[c], results)
                else:
                    await _conversation(c)

        async def _conversation(c: int) -> None:
            history: list[dict[str, str]] = []
            for t in range(cfg.turns):
                history.append({"role": "user", "content": messages[c][t]})
                body = {
                    "model": model,
                    "messages": history,
                    "max_tokens": cfg.answer_len,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                result = TurnResult(conversation=c, turn=t + 1)
                answer = await _turn(client, url, body, result)
                results.append(result)
                if cfg.progress:
                    _print_progress(result)
                if not result.success:
                    return  # the rest of this conversation would not be the same conversation
                history.append({"role": "assistant", "content": answer})
                if cfg.think_time and t < cfg.turns - 1:
                    await asyncio.sleep(cfg.think_time)

        start = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(cfg.conversations)))
        duration = time.perf_counter() - start
    summary = summarize(cfg, model, results, duration)
    if cfg.token_ids:
        summary["user_messages_sha256"] = hashlib.sha256(json.dumps(id_messages).encode()).hexdigest()
    return summary


def _ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {
        "mean_ttft_ms": statistics.fmean(ms) if ms else 0.0,
        "median_ttft_ms": statistics.median(ms) if ms else 0.0,
        "p90_ttft_ms": _percentile(ms, 90),
        "max_ttft_ms": max(ms) if ms else 0.0,
    }


def _cached_ratio(results: list[TurnResult]) -> float | None:
    reported = [r for r in results if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in reported)
    if not reported or not prompt:
        return None
    return sum(r.cached_tokens or 0 for r in reported) / prompt


def summarize(cfg: ChatBenchConfig, model: str, results: list[TurnResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    per_turn = []
    for t in range(1, cfg.turns + 1):
        rows = [r for r in ok if r.turn == t]
        per_turn.append(
            {
                "turn": t,
                "completed": len(rows),
                "mean_prompt_tokens": statistics.fmean([r.prompt_tokens for r in rows]) if rows else 0.0,
                "cached_ratio": _cached_ratio(rows),
                **_ms([r.ttft for r in rows]),
            }
        )
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.completion_tokens for r in ok)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_url": api_root(cfg.base_url),
        "model_id": model,
        "config": asdict(cfg) | {"api_key": None},
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_prompt_tokens": total_in,
        "total_output_tokens": total_out,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "cached_ratio_after_turn_1": _cached_ratio([r for r in ok if r.turn > 1]),
        "per_turn": per_turn,
        "requests": [asdict(r) for r in results],
    }


def format_summary(s: dict) -> str:
    lines = ["{s:{c}^72}".format(s=" Multi-turn Chat Benchmark ", c="=")]
    cfg = s["config"]
    lines.append(
        f"{cfg['conversations']} conversations x {cfg['turns']} turns, ~{cfg['user_len']} user tokens and "
        f"{cfg['answer_len']} answer tokens per turn, think time {cfg['think_time']} s"
        + (f", {cfg['concurrency']} at a time" if cfg.get("concurrency") else "")
    )
    lines.append(
        f"{'turn':>4} {'done':>5} {'prompt tok':>11} {'cached':>8} {'TTFT mean':>11} {'median':>9} {'p90':>9} "
        f"{'max':>9}"
    )
    for row in s["per_turn"]:
        cached = "n/a" if row["cached_ratio"] is None else f"{row['cached_ratio']:.1%}"
        lines.append(
            f"{row['turn']:>4} {row['completed']:>5} {row['mean_prompt_tokens']:>11.0f} {cached:>8} "
            f"{row['mean_ttft_ms']:>9.1f}ms {row['median_ttft_ms']:>7.1f}ms {row['p90_ttft_ms']:>7.1f}ms "
            f"{row.get('max_ttft_ms', 0.0):>7.1f}ms"
        )
    ratio = s["cached_ratio_after_turn_1"]
    lines.append("-" * 72)
    lines.append(f"{'Successful / failed turns:':<45}{s['completed']:>12} / {s['failed']}")
    lines.append(f"{'Duration (s):':<45}{s['duration']:>15.2f}")
    lines.append(f"{'Output token throughput (tok/s):':<45}{s['output_throughput']:>15.2f}")
    lines.append(f"{'Total token throughput (tok/s):':<45}{s['total_token_throughput']:>15.2f}")
    lines.append(f"{'Cached prompt tokens, turns 2+:':<45}{'n/a' if ratio is None else f'{ratio:.1%}':>15}")
    if s.get("user_messages_sha256"):
        lines.append(f"{'User messages (token ids), sha256:':<45}{s['user_messages_sha256'][:15]:>15}")
    for e in sorted({r["error"] for r in s["requests"] if r["error"]})[:5]:
        lines.append(f"error: {e}")
    lines.append("=" * 72)
    return "\n".join(lines)


def plot(summaries: list[tuple[str, dict]], path: Path) -> None:
    """TTFT (mean and p90) against turn, one line pair per labelled run."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'rnnserve[loadtest]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in summaries:
        turns = [row["turn"] for row in s["per_turn"]]
        line = ax.plot(turns, [row["mean_ttft_ms"] for row in s["per_turn"]], marker="o", label=f"{label} mean")[0]
        ax.plot(
            turns, [row["p90_ttft_ms"] for row in s["per_turn"]], linestyle="--", color=line.get_color(), label="p90"
        )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rnnserve bench chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a /v1 suffix is fine)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--conversations", type=int, default=8, help="conversations (all at once unless --concurrency)")
    p.add_argument("--concurrency", type=int, default=None, help="conversations in flight at once (default: all)")
    p.add_argument("--turns", type=int, default=10, help="turns per conversation")
    p.add_argument(
        "--token-ids",
        action="store_true",
        help="send token ids on the completions endpoint (the same prompts for every server; see above)",
    )
    p.add_argument(
        "--api",
        choices=["openai", "llamacpp"],
        default="openai",
        help="with --token-ids: /v1/completions with return_token_ids, or llama.cpp's /completion",
    )
    p.add_argument("--user-len", type=int, default=200, help="tokens per user message (approximate)")
    p.add_argument("--answer-len", type=int, default=128, help="tokens per answer")
    p.add_argument("--think-time", type=float, default=0.0, help="seconds between an answer and the next message")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="default: $RNNSERVE_API_KEY, else $OPENAI_API_KEY")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json", type=Path, default=None, help="write the full result (per request too) here")
    p.add_argument("--progress", action="store_true", help="print each turn as it finishes (stderr)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of TTFT against turn (needs matplotlib)")
    p.add_argument("--label", default="server", help="this run's name in the plot legend")
    p.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="a --json of another run (LABEL=PATH or PATH) drawn in the same plot",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = ChatBenchConfig(
            base_url=args.base_url,
            model=args.model,
            conversations=args.conversations,
            turns=args.turns,
            user_len=args.user_len,
            answer_len=args.answer_len,
            think_time=args.think_time,
            seed=args.seed,
            api_key=args.api_key or api_key_from_env(),
            timeout_s=args.timeout,
            concurrency=args.concurrency,
            token_ids=args.token_ids,
            api=args.api,
            progress=args.progress,
        )
        summary = asyncio.run(run_benchmark(cfg))
        print(format_summary(summary))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2))
            print(f"wrote {args.json}")
        if args.plot:
            runs = [(args.label, summary)]
            for item in args.compare:
                label, _, path = str(item).rpartition("=")
                runs.append((label or Path(path).stem, json.loads(Path(path).read_text())))
            plot(runs, args.plot)
            print(f"wrote {args.plot}")
    except (ValueError, OSError, BenchError) as exc:
        print_error(str(exc))
        return 2
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
