"""``rnnserve serve`` with no arguments serves the embedded default model (the trained Python
completer shipped in the package), completion and chat included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from rnnserve.models.default import DEFAULT_MODEL_NAME, default_model_path
from tests.e2e.conftest import LiveServer, start_server, stop_server


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server([], tmp_path_factory.mktemp("default-model") / "server.log")
    try:
        yield server
    finally:
        stop_server(server)


def test_default_model_chats_out_of_the_box(default_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=default_server.v1, api_key="unused", max_retries=0, timeout=60)
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL_NAME]
    assert Path((models[0].model_extra or {})["root"]).name == models[0].id
    r = client.chat.completions.create(
        model=models[0].id, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n"
    c = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
    own = AutoTokenizer.from_pretrained(default_model_path())  # the server tokenizes with the shipped tokenizer
    assert c.usage.prompt_tokens == len(own(prompt)["input_ids"])
    assert c.choices[0].text.strip()
    assert f"{default_server.base_url}/v1" in default_server.log_text()
