"""The HTTP API through the ASGI app with the real engine and a tiny random Mamba (greedy unless noted)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rnnserve.config import ServerConfig
from rnnserve.engine.request import FinishReason, RequestOutput, SamplingParams
from rnnserve.server.app import build_app
from rnnserve.server.tokenizer import load_tokenizer
from tests.server.conftest import make_app

GREEDY = {"temperature": 0.0}


def sse_events(lines: list[str]) -> list[dict | str]:
    """Parse an SSE body: every event must be ``data: ...`` followed by a blank line."""
    events: list[dict | str] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(client: TestClient, path: str, body: dict) -> list[dict | str]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_lines()))


def complete(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "tiny-mamba", **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: TestClient, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": "tiny-mamba", **body})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_idle(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(client, "vllm:num_requests_running") == 0 and metric(client, "rnnserve:state_pool_usage") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("requests still running / slots still held")


# ---------------------------------------------------------------- completions


def test_prompt_forms_and_choice_order(app_client: TestClient) -> None:
    ids = app_client.post("/tokenize", json={"prompt": "The cat"}).json()["tokens"]
    one = complete(app_client, prompt="The cat", max_tokens=6, **GREEDY)
    assert one["object"] == "text_completion"
    assert len(one["choices"]) == 1 and one["choices"][0]["finish_reason"] == "length"
    assert one["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 6,
        "total_tokens": len(ids) + 6,
        "prompt_tokens_details": {"cached_tokens": 0},  # this app runs without the prefix cache
    }
    text = one["choices"][0]["text"]
    assert complete(app_client, prompt=ids, max_tokens=6, **GREEDY)["choices"][0]["text"] == text

    many = complete(app_client, prompt=["The cat", "A dog"], n=2, max_tokens=6, **GREEDY)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in many["choices"]]
    assert texts[0] == texts[1] == text  # prompt 0, choices 0 and 1 (greedy)
    assert texts[2] == texts[3] != text
    assert many["usage"]["completion_tokens"] == 24
    other_ids = app_client.post("/tokenize", json={"prompt": "A dog"}).json()["tokens"]
    assert many["usage"]["prompt_tokens"] == len(ids) + len(other_ids)
    by_ids = complete(app_client, prompt=[ids, other_ids], max_tokens=6, **GREEDY)
    assert [c["text"] for c in by_ids["choices"]] == [text, texts[2]]
    wait_idle(app_client)


def test_seed_reproducible_and_n_choices_differ(app_client: TestClient) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    a = complete(app_client, **body)["choices"][0]["text"]
    assert complete(app_client, **body)["choices"][0]["text"] == a
    assert complete(app_client, **{**body, "seed": 99})["choices"][0]["text"] != a
    two = complete(app_client, **body, n=2)["choices"]
    assert two[0]["text"] == a
    assert two[1]["text"] != a


def test_echo_and_legacy_logprobs(app_client: TestClient) -> None:
    ids = app_client.post("/tokenize", json={"prompt": "Hello there world"}).json()["tokens"]
    r = complete(app_client, prompt="Hello there world", max_tokens=5, echo=True, logprobs=3, **GREEDY)
    choice = r["choices"][0]
    assert choice["text"].startswith("Hello there world")
    lp = choice["logprobs"]
    n = len(ids) + 5
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    for tok, chosen, top in zip(
        lp["tokens"][len(ids) :], lp["token_logprobs"][len(ids) :], lp["top_logprobs"][len(ids) :]
    ):
        # Greedy: the chosen token is the most likely one, and is listed among the top.
        assert top[tok] == pytest.approx(chosen)
        assert chosen >= max(top.values()) - 1e-6
        assert 3 <= len(top) <= 4
    no_echo = complete(app_client, prompt="Hello there world", max_tokens=5, logprobs=0, **GREEDY)["choices"][0]
    assert no_echo["text"] == choice["text"][len("Hello there world") :]
    assert len(no_echo["logprobs"]["tokens"]) == 5
    assert no_echo["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][len(ids) :], abs=1e-4)


def test_completion_stream_framing_with_usage(app_client: TestClient) -> None:
    body = {"prompt": "Streaming is", "max_tokens": 7, **GREEDY}
    full = complete(app_client, **body)
    events = stream(app_client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == [] and usage_event["usage"] == full["usage"]
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    no_usage = stream(app_client, "/v1/completions", body)
    assert no_usage[-1] == "[DONE]" and all(e == "[DONE]" or e["choices"] for e in no_usage)


def _boundary_stop(tokens: list[str], text: str) -> str:
    """A stop string made of the end of one token and the start of the next."""
    pos = 0
    for a, b in itertools.pairwise(tokens):
        pos += len(a)
        if len(a.strip()) >= 2 and len(b.strip()) >= 2 and a.isascii() and b.isascii() and pos > 4:
            return a[-2:] + b[:2]
    pytest.skip(f"no two adjacent ASCII tokens in {text!r}")


def test_stop_string_across_tokens_is_never_emitted(app_client: TestClient) -> None:
    base = complete(app_client, prompt="The quick brown fox", max_tokens=24, logprobs=0, **GREEDY)["choices"][0]
    stop = _boundary_stop(base["logprobs"]["tokens"], base["text"])
    expected = base["text"][: base["text"].find(stop)]
    body = {"prompt": "The quick brown fox", "max_tokens": 24, "stop": [stop, "never-there"], **GREEDY}
    got = complete(app_client, **body)["choices"][0]
    assert (got["text"], got["finish_reason"], got["stop_reason"]) == (expected, "stop", stop)
    events = stream(app_client, "/v1/completions", body)
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == expected and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any(stop in t for t in texts)
    included = complete(app_client, **body, include_stop_str_in_output=True)["choices"][0]["text"]
    assert included == expected + stop
    wait_idle(app_client)  # the stopped request was aborted in the engine and its slot freed


# ---------------------------------------------------------------- chat

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


def test_chat_completion_and_logprobs(app_client: TestClient) -> None:
    prompt_ids = app_client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    expected_prompt = "<|system|>\nYou are terse.\n<|user|>\nSay something.\n<|assistant|>\n"
    assert app_client.post("/detokenize", json={"tokens": prompt_ids}).json()["prompt"] == expected_prompt
    r = chat(app_client, messages=MESSAGES, max_completion_tokens=6, logprobs=True, top_logprobs=2, **GREEDY)
    assert r["object"] == "chat.completion"
    choice = r["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] == len(prompt_ids) and r["usage"]["completion_tokens"] == 6
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] >= entry["top_logprobs"][0]["logprob"] - 1e-6
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert isinstance(entry["bytes"], list)
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace") == choice["message"]["content"]
    # max_tokens is the older name of max_completion_tokens; content parts are joined.
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]},
    ]
    again = chat(app_client, messages=parts, max_tokens=6, **GREEDY)
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert again["choices"][0]["logprobs"] is None


def test_chat_stream_framing(app_client: TestClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 5, "n": 2, **GREEDY}
    full = chat(app_client, **body)
    events = stream(app_client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == full["usage"]
    for index in (0, 1):
        chunks = [e["choices"][0] for e in events[:-2] if e["choices"][0]["index"] == index]
        # The role goes out with the first text; then content deltas; then an empty delta with the reason.
        assert chunks[0]["delta"]["role"] == "assistant" and "content" in chunks[0]["delta"]
        assert all("role" not in c["delta"] for c in chunks[1:])
        assert chunks[-1]["delta"] == {} and chunks[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in chunks[:-1])
        content = "".join(c["delta"].get("content", "") for c in chunks)
        assert content == full["choices"][index]["message"]["content"]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_stop_string(app_client: TestClient) -> None:
    base = chat(app_client, messages=MESSAGES, max_tokens=24, logprobs=True, **GREEDY)["choices"][0]
    tokens = [e["token"] for e in base["logprobs"]["content"]]
    stop = _boundary_stop(tokens, base["message"]["content"])
    expected = base["message"]["content"][: base["message"]["content"].find(stop)]
    got = chat(app_client, messages=MESSAGES, max_tokens=24, stop=stop, **GREEDY)["choices"][0]
    assert (got["message"]["content"], got["finish_reason"]) == (expected, "stop")
    events = stream(
        app_client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 24, "stop": stop, **GREEDY}
    )
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_template_override_and_missing_template(model_dir: Path, neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    with TestClient(make_app(model_dir, chat_template=str(f))) as client:
        assert (
            client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
            == client.post("/tokenize", json={"prompt": "You are terse.|Say something.|"}).json()["tokens"]
        )
    with TestClient(make_app(model_dir, tokenizer=str(neox_tokenizer_dir))) as client:
        err = assert_error(client.post("/v1/chat/completions", json={"messages": MESSAGES}), 400, "messages")
        assert "chat template" in err["message"]
        assert complete(client, prompt="still works", max_tokens=2)["choices"][0]["text"]


# ---------------------------------------------------------------- other endpoints


def test_models_health_version_tokenize(app_client: TestClient, model_dir: Path) -> None:
    models = app_client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert (card["id"], card["root"], card["owned_by"], card["max_model_len"]) == (
        "tiny-mamba",
        "tiny-mamba",  # never the server's local path
        "rnnserve",
        None,
    )
    assert app_client.get("/health").status_code == 200
    engine = app_client.app.state.ctx.engine
    assert engine.is_running
    assert app_client.get("/version").json()["version"]
    tok = app_client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == 2 and tok["token_strs"] == ["hello", " world"]
    assert app_client.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "hello world"}
    assert_error(app_client.post("/detokenize", json={"tokens": [10**7]}), 400, "tokens")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [5, 10**7]}, "prompt"),
        ("/v1/completions", {"prompt": [[5], []]}, "prompt.1"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 5}, "presence_penalty"),
    ],
)
def test_bad_parameters_are_400(app_client: TestClient, path: str, body: dict, param: str) -> None:
    assert_error(app_client.post(path, json=body), 400, param)


def test_malformed_json_unknown_model_and_unknown_fields(app_client: TestClient) -> None:
    r = app_client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)
    err = assert_error(app_client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    ok = complete(app_client, prompt="x", max_tokens=2, some_future_field={"a": 1}, best_of=1)
    assert len(ok["choices"]) == 1 and "token_ids" not in ok["choices"][0]
    # A form or text/plain POST (what a web page can send cross-origin without a preflight) is refused.
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        r = app_client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers=headers)
        assert assert_error(r, 415)["code"] == "unsupported_media_type"
    wait_idle(app_client)


def test_context_length_limit(model_dir: Path) -> None:
    with TestClient(make_app(model_dir, max_model_len=24)) as client:
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 24
        err = assert_error(client.post("/v1/completions", json={"prompt": list(range(100, 125)), "max_tokens": 1}), 400)
        assert err["code"] == "context_length_exceeded"
        assert_error(client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 23}), 400, "max_tokens")
        assert complete(client, prompt=[5, 6], max_tokens=22)["usage"]["completion_tokens"] == 22
        # Without max_tokens (OpenAI's default of 16), generation just stops at the limit.
        r = complete(client, prompt=list(range(100, 120)))
        assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "length"
        # Chat with no max_tokens stops at the context limit.
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]}).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["total_tokens"] == 24


def test_api_key(model_dir: Path) -> None:
    with TestClient(make_app(model_dir, server=ServerConfig(api_key="sekret"))) as client:
        body = {"prompt": "x", "max_tokens": 1}
        assert_error(client.post("/v1/completions", json=body), 401)
        assert_error(client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(client.get("/v1/models"), 401)
        assert_error(client.post("/tokenize", json={"prompt": "x"}), 401)
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_body_size_limit(model_dir: Path) -> None:
    with TestClient(make_app(model_dir, server=ServerConfig(max_request_bytes=2000))) as client:
        big = json.dumps({"prompt": "word " * 1000, "max_tokens": 1}).encode()
        err = assert_error(
            client.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413
        )
        assert err["code"] == "request_too_large"

        def chunks():
            for i in range(0, len(big), 500):
                yield big[i : i + 500]

        # No Content-Length: the body is counted as it streams in.
        r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413)
        assert complete(client, prompt="small", max_tokens=1)["choices"]


def test_model_without_tokenizer(bare_model_dir: Path) -> None:
    with TestClient(make_app(bare_model_dir)) as client:
        r = complete(client, prompt=[11, 12, 13], max_tokens=3, logprobs=1)
        assert r["usage"]["completion_tokens"] == 3
        assert all(t.startswith("token_id:") for t in r["choices"][0]["logprobs"]["tokens"])
        err = assert_error(client.post("/v1/completions", json={"prompt": "text"}), 400, "prompt")
        assert "no tokenizer" in err["message"]
        assert_error(client.post("/v1/chat/completions", json={"messages": MESSAGES}), 400, "messages")
        assert_error(client.post("/v1/completions", json={"prompt": [11], "stop": "x"}), 400, "stop")


class FailingEngine:
    """An engine whose requests fail inside a step, and one that rejects its input."""

    max_model_len = None
    vocab_size = 50280

    def __init__(self, reject: bool = False, tokens_before_failing: int = 0) -> None:
        self.reject = reject
        self.tokens_before_failing = tokens_before_failing

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self):
        raise RuntimeError("no stats")

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.reject:
            raise ValueError("the engine does not like this prompt")
        for i in range(self.tokens_before_failing):
            yield RequestOutput(request_id, [(25521, 1533)[i % 2]], None, len(prompt_token_ids), i + 1, False)
        yield RequestOutput(request_id, [], None, len(prompt_token_ids), 0, True, FinishReason.ERROR, error="boom")


def test_engine_failure_is_500_and_engine_rejection_is_400() -> None:
    with TestClient(build_app(FailingEngine(), None, model_name="f", model_root="/f")) as client:
        for stream_it in (False, True):
            r = client.post("/v1/completions", json={"prompt": [1, 2], "stream": stream_it})
            err = assert_error(r, 500)
            assert "boom" not in err["message"] and err["code"] == "engine_error"  # the cause is only logged
    with TestClient(build_app(FailingEngine(reject=True), None, model_name="f", model_root="/f")) as client:
        for stream_it in (False, True):
            err = assert_error(client.post("/v1/completions", json={"prompt": [1, 2], "stream": stream_it}), 400)
            assert "does not like" in err["message"]


def test_engine_failure_mid_stream_is_an_error_event(neox_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    app = build_app(FailingEngine(tokens_before_failing=2), tok, model_name="f", model_root="/f")
    with TestClient(app) as client:
        events = stream(client, "/v1/completions", {"prompt": "x"})
        assert [e["choices"][0]["text"] for e in events[:2]] == ["hello", " world"]
        assert "boom" not in events[2]["error"]["message"] and events[2]["error"]["code"] == "engine_error"
        assert events[3:] == ["[DONE]"]


def test_token_ids_match_transformers_greedy_generate(app_client: TestClient, model_dir: Path) -> None:
    """Served greedily, the tokens are transformers' own greedy ``generate()`` tokens."""
    import torch
    from transformers import MambaForCausalLM

    prompt = [510, 3158, 8516, 30013, 27287, 689, 253, 22658]
    ref = MambaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    expected = out[0, len(prompt) :].tolist()
    body = {"prompt": prompt, "max_tokens": 16, "ignore_eos": True, "return_token_ids": True, **GREEDY}
    choice = complete(app_client, **body)["choices"][0]
    assert choice["prompt_token_ids"] == prompt
    assert choice["token_ids"] == expected
    tok = load_tokenizer(model_dir)
    assert choice["text"] == tok.decode(expected)
    events = stream(app_client, "/v1/completions", body)
    assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == expected
    assert events[0]["choices"][0]["prompt_token_ids"] == prompt


def test_return_token_ids_in_chat_and_as_logprob_tokens(app_client: TestClient) -> None:
    r = chat(app_client, messages=MESSAGES, max_tokens=5, return_token_ids=True, logprobs=True, **GREEDY)
    ids = r["choices"][0]["token_ids"]
    assert (
        len(ids) == 5
        and r["prompt_token_ids"] == app_client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    )
    events = stream(
        app_client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "return_token_ids": True, **GREEDY}
    )
    assert [t for e in events[:-1] for t in e["choices"][0].get("token_ids", [])] == ids
    as_ids = complete(
        app_client,
        prompt="abc",
        max_tokens=3,
        logprobs=1,
        return_tokens_as_token_ids=True,
        return_token_ids=True,
        **GREEDY,
    )
    choice = as_ids["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]


def test_echo_with_max_tokens_0_scores_the_prompt(app_client: TestClient) -> None:
    body = {"prompt": "Score this prompt", "echo": True, "logprobs": 1, **GREEDY}
    scored = complete(app_client, **body, max_tokens=0)
    generated = complete(app_client, **body, max_tokens=3)
    choice = scored["choices"][0]
    assert choice["text"] == "Score this prompt" and choice["finish_reason"] == "length"
    assert scored["usage"]["completion_tokens"] == 0
    n = scored["usage"]["prompt_tokens"]
    assert choice["logprobs"]["token_logprobs"] == generated["choices"][0]["logprobs"]["token_logprobs"][:n]
    assert_error(app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")


def test_stop_strings_wait_for_min_tokens(app_client: TestClient) -> None:
    base = complete(app_client, prompt="The quick brown fox", max_tokens=24, logprobs=0, **GREEDY)["choices"][0]
    stop = _boundary_stop(base["logprobs"]["tokens"], base["text"])
    body = {"prompt": "The quick brown fox", "max_tokens": 24, "stop": stop, **GREEDY}
    early = complete(app_client, **body)
    late = complete(app_client, **body, min_tokens=16)
    assert early["usage"]["completion_tokens"] < 16 <= late["usage"]["completion_tokens"]
    assert late["choices"][0]["text"].startswith(early["choices"][0]["text"] + stop)


def test_health_is_503_when_the_engine_loop_is_gone(model_dir: Path) -> None:
    with TestClient(make_app(model_dir)) as client:
        engine = client.app.state.ctx.engine
        assert client.get("/health").status_code == 200
        client.portal.call(engine.shutdown)
        assert client.get("/health").status_code == 503


def test_logit_bias_forces_and_bans_tokens(app_client: TestClient) -> None:
    body = {"prompt": "The weather", "max_tokens": 4, "ignore_eos": True, "return_token_ids": True, **GREEDY}
    plain = complete(app_client, **body)["choices"][0]["token_ids"]
    assert complete(app_client, **body, logit_bias={"7": 100})["choices"][0]["token_ids"] == [7, 7, 7, 7]
    banned = complete(app_client, **body, logit_bias={str(plain[0]): -100})["choices"][0]["token_ids"]
    assert banned[0] != plain[0]
    r = chat(app_client, messages=MESSAGES, max_tokens=3, return_token_ids=True, logit_bias={"11": 100.0}, **GREEDY)
    assert r["choices"][0]["token_ids"] == [11, 11, 11]


@pytest.mark.parametrize("bias", [{"abc": 1}, {"99999999": 1}, {"-1": 1}, {"5": 150}])
def test_a_bad_logit_bias_is_a_400(app_client: TestClient, bias: dict) -> None:
    body = {"model": "tiny-mamba", "prompt": "x", "max_tokens": 1, "logit_bias": bias}
    assert_error(app_client.post("/v1/completions", json=body), 400, "logit_bias")
