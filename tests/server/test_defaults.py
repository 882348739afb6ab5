"""What a request that leaves things out gets: OpenAI's 16 tokens for a completion, a bounded
answer for a chat (never past the context), and a malformed body named as such, not by the
character offset pydantic reports."""

from __future__ import annotations

from fastapi.testclient import TestClient

from rnnserve.server.generation import DEFAULT_CHAT_MAX_TOKENS, default_chat_max_tokens


def test_default_chat_max_tokens_stays_inside_the_context() -> None:
    assert default_chat_max_tokens(10, None) == DEFAULT_CHAT_MAX_TOKENS
    assert default_chat_max_tokens(10, 10_000) == DEFAULT_CHAT_MAX_TOKENS
    assert default_chat_max_tokens(10, 50) == 40
    assert default_chat_max_tokens(50, 50) is None  # nothing left: the engine stops at the limit


def test_requests_without_max_tokens_are_bounded(app_client: TestClient) -> None:
    body = {"ignore_eos": True, "temperature": 0.0}
    r = app_client.post("/v1/completions", json={"prompt": "def f(", **body}).json()
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"
    r = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body}).json()
    assert r["usage"]["completion_tokens"] == DEFAULT_CHAT_MAX_TOKENS
    assert r["choices"][0]["finish_reason"] == "length"


def test_malformed_json_names_no_offset_as_param(app_client: TestClient) -> None:
    r = app_client.post("/v1/completions", content=b'{"prompt": "x",, }', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] is None and err["code"] == "invalid_json"
    assert "not valid JSON" in err["message"] and "at character 15" in err["message"]
