"""A locust user that streams completions from any OpenAI-compatible server.

Each request is reported as the locust request ``POST /v1/completions`` (or chat), failed on any
HTTP error, error chunk or empty stream, and four measurements of it are reported as their own
locust events (request type ``METRIC``), so locust's tables, charts and CSVs show their percentiles:

- ``TTFT (ms)``: time to the first chunk with text;
- ``ITL (ms)``: each gap between text chunks;
- ``output tokens/s``: the request's output tokens (from ``usage``) over its whole time, request
  start to end of stream (the "response time" column then holds tokens/s, not ms). Not over the
  time after the first text: a server that holds text back (an incomplete UTF-8 character, a
  possible stop string) may send most tokens in the last chunks, and that quotient is meaningless;
- ``E2E (ms)``: request start to the end of the stream.

Run headless (a server on :8000)::

    locust -f rnnserve/loadtest/locustfile.py --headless -u 4 -r 2 -t 20s --host http://127.0.0.1:8000

Options (after the locust ones, or as environment variables): ``--model`` / ``RNNSERVE_MODEL``
(default: the first of /v1/models), ``--endpoint completions|chat``, ``--input-len`` (words, ~tokens),
``--output-len``, ``--api-key`` / ``RNNSERVE_API_KEY`` / ``OPENAI_API_KEY``, ``--max-requests`` /
``RNNSERVE_MAX_REQUESTS`` (stop the run after that many requests). This file imports nothing of rnnserve, so the stock
``locustio/locust`` image runs it as is (see docker-compose.yml, profile ``loadtest``).
"""

from __future__ import annotations

import json
import os
import random
import time

import gevent
from locust import HttpUser, between, events, task
from locust.exception import StopUser

_WORD_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look"
)
_WORDS = _WORD_TEXT.split()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--model", default=os.environ.get("RNNSERVE_MODEL", ""), help="model name (default: first)")
    parser.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default=os.environ.get("RNNSERVE_ENDPOINT", "completions"),
        help="which OpenAI endpoint to stream",
    )
    parser.add_argument("--input-len", type=int, default=int(os.environ.get("RNNSERVE_INPUT_LEN", "128")))
    parser.add_argument("--output-len", type=int, default=int(os.environ.get("RNNSERVE_OUTPUT_LEN", "64")))
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RNNSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY", ""),
        help="bearer token (default: $RNNSERVE_API_KEY, else $OPENAI_API_KEY)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=int(os.environ.get("RNNSERVE_MAX_REQUESTS", "0")),
        help="stop the run after this many streamed requests, done or failed (0: run for --run-time)",
    )


def _text_of(chunk: dict) -> str:
    out = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        out.append((delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or ""))
    return "".join(out)


class OpenAIStreamingUser(HttpUser):
    """One simulated client: a streamed request of random words, then a short think time."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.endpoint = getattr(opts, "endpoint", "completions")
        self.input_len = getattr(opts, "input_len", 128)
        self.output_len = getattr(opts, "output_len", 64)
        api_key = getattr(opts, "api_key", "")
        if api_key:
            self.client.headers["Authorization"] = f"Bearer {api_key}"
        self.model = getattr(opts, "model", "")
        if not self.model:
            resp = self.client.get("/v1/models", name="GET /v1/models")
            listed = (resp.json().get("data") if resp.ok else None) or [{}]
            self.model = listed[0].get("id", "")

    def _count_request(self) -> None:
        """Stop the whole run once ``--max-requests`` requests have ended (the count lives on the
        environment, shared by every user of this process)."""
        env = self.environment
        limit = getattr(env.parsed_options, "max_requests", 0)
        if not limit or env.runner is None:
            return
        done = getattr(env, "rnnserve_requests_done", 0) + 1
        env.rnnserve_requests_done = done
        if done == limit:
            # From a separate greenlet: quitting stops every user, this one included.
            gevent.spawn(env.runner.quit)

    def _metric(self, name: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="METRIC", name=name, response_time=value, response_length=length, exception=None, context={}
        )

    @task
    def stream(self) -> None:
        limit = getattr(self.environment.parsed_options, "max_requests", 0)
        if limit and getattr(self.environment, "rnnserve_requests_done", 0) >= limit:
            # The run is quitting (from another greenlet, which a busy machine may start late): no new request.
            raise StopUser()
        try:
            self._stream()
        finally:
            self._count_request()

    def _stream(self) -> None:
        prompt = " ".join(random.choice(_WORDS) for _ in range(self.input_len))
        body: dict = {
            "model": self.model,
            "max_tokens": self.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.endpoint == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            path = "/v1/completions"
            body["prompt"] = prompt
        start = time.perf_counter()
        first = last = 0.0
        gaps: list[float] = []
        chunks = tokens = 0
        with self.client.post(path, json=body, stream=True, catch_response=True, name=f"POST {path}") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for raw in resp.iter_lines():
                    line = raw.decode() if isinstance(raw, bytes) else raw
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        resp.failure(f"error chunk: {str(chunk['error'])[:200]}")
                        return
                    now = time.perf_counter()
                    if _text_of(chunk):
                        if chunks == 0:
                            first = now
                        else:
                            gaps.append(now - last)
                        chunks += 1
                        last = now
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"].get("completion_tokens") or 0)
            except (OSError, ValueError) as exc:
                resp.failure(f"{type(exc).__name__}: {exc}")
                return
            end = time.perf_counter()
            if chunks == 0:
                resp.failure("the stream carried no text")
                return
            resp.success()
        tokens = tokens or chunks
        self._metric("TTFT (ms)", (first - start) * 1000.0)
        for gap in gaps:
            self._metric("ITL (ms)", gap * 1000.0)
        if end > start:
            self._metric("output tokens/s", tokens / (end - start), tokens)
        self._metric("E2E (ms)", (end - start) * 1000.0, tokens)
