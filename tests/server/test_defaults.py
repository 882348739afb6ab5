"""What a request that leaves things out gets: OpenAI's 16 tokens for a completion, a bounded
answer for a chat (never past the context), the sampling the model's generation_config.json
recommends (else OpenAI's), and a malformed body named as such, not by the character offset
pydantic reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rnnserve.models.default import default_model_path
from rnnserve.models.loader import ModelLoadError
from rnnserve.server.generation import DEFAULT_CHAT_MAX_TOKENS, default_chat_max_tokens
from rnnserve.server.sampling_defaults import SamplingDefaults
from tests.server.conftest import make_app


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


def test_sampling_defaults_come_from_generation_config(tmp_path: Path) -> None:
    assert SamplingDefaults.from_model_folder(tmp_path) == SamplingDefaults()  # no file: OpenAI's
    assert SamplingDefaults.from_model_folder(tmp_path / "model.pth") == SamplingDefaults()  # a single-file model
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"bos_token_id": 0, "temperature": 0.3, "top_k": 20, "top_p": None}))
    assert SamplingDefaults.from_model_folder(tmp_path) == SamplingDefaults(temperature=0.3, top_k=20)
    # The embedded default model recommends a low temperature: sampled at 1.0 its answers are noise.
    assert SamplingDefaults.from_model_folder(default_model_path()).temperature < 1.0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ("[0.3]", "not a JSON object"),
        ('{"temperature": -1}', "temperature must be in [0, 100]"),
        ('{"top_k": 2.5}', "top_k must be a number"),
        ('{"top_p": true}', "top_p must be a number"),
    ],
)
def test_a_bad_generation_config_fails_the_start(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"generation_config\.json") as info:
        SamplingDefaults.from_model_folder(tmp_path)
    assert words in str(info.value)


def test_a_request_leaving_sampling_out_gets_the_models_defaults(model_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(model_dir, tmp_path / "greedy-mamba"))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    with TestClient(make_app(folder, name="greedy-mamba")) as client:

        def text(**fields: object) -> str:
            body = {"prompt": "def f(", "max_tokens": 12, "ignore_eos": True, **fields}
            return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        greedy = text(temperature=0.0)
        # No temperature in the body: the model's 0.0, so every seed gives the greedy text ...
        assert text(seed=1) == text(seed=2) == greedy
        # ... while a body's own temperature wins: random weights sampled at 1.0 differ by seed.
        assert text(temperature=1.0, seed=1) != text(temperature=1.0, seed=2)
