"""The README's query examples, parsed from README.md (not copied here) and run as a newcomer would
run them against ``rnnserve serve`` with no flags (the embedded default model) on a free local port:
every ``curl`` line, the Python example, ``rnnserve complete`` and ``rnnserve chat``. Each must
succeed and produce text, so the README cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import LiveServer, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"  # what the README's examples query (`make serve`)
TIMEOUT_S = 45


@dataclass(frozen=True)
class Example:
    kind: str  # "curl", "python", "complete" or "chat"
    text: str  # the command line (continuations joined) or the Python source


def code_blocks(markdown: str) -> Iterator[tuple[str, str]]:
    """(language, body) of every fenced block."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", markdown, re.M | re.S):
        yield m.group(1), m.group(2)


def shell_lines(body: str) -> Iterator[str]:
    """Commands of a shell block: backslash continuations joined, comments and blank lines dropped."""
    for line in re.sub(r"\\\n\s*", " ", body).splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def readme_examples(markdown: str) -> list[Example]:
    out = []
    for lang, body in code_blocks(markdown):
        if lang == "python" and "openai" in body:
            out.append(Example("python", body))
        if lang != "bash":
            continue
        for line in shell_lines(body):
            words = shlex.split(line)
            if words[0] == "curl" and README_URL in line:
                out.append(Example("curl", line))
            elif Path(words[0]).name == "rnnserve" and words[1:2] in (["complete"], ["chat"]):
                out.append(Example(words[1], line))
    return out


def rnnserve_command() -> list[str]:
    """The installed ``rnnserve`` script of this interpreter (``.venv/bin/rnnserve`` after make)."""
    script = Path(sys.executable).with_name("rnnserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rnnserve"]


def test_the_readme_has_the_examples_this_test_runs() -> None:
    kinds = [e.kind for e in readme_examples(README.read_text())]
    assert kinds.count("curl") >= 2 and {"python", "complete", "chat"} <= set(kinds), kinds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("newcomer")
    live = start_server([], folder / "server.log")
    try:
        yield live
    finally:
        stop_server(live)


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RNNSERVE_API_KEY", "OPENAI_API_KEY")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], tmp_path: Path, stdin: str = "") -> str:
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path, env=_client_env()
    )
    report = f"{shlex.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, report
    return proc.stdout


def _text_of_response(body: str) -> str:
    """The generated text of a completions or chat response, plain JSON or an SSE stream."""
    if body.lstrip().startswith("data:"):
        events = [line[len("data:") :].strip() for line in body.splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]", body[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not [c for c in chunks if "error" in c], body[-500:]
        return "".join(
            (c.get("text") or (c.get("delta") or {}).get("content") or "") for ch in chunks for c in ch["choices"]
        )
    choice = json.loads(body)["choices"][0]
    return choice.get("text") or (choice.get("message") or {}).get("content") or ""


def _run_example(example: Example, server: LiveServer, served: str, tmp_path: Path) -> str:
    """Run one README example against ``server``; returns the text it generated."""
    text = example.text.replace(README_URL, server.base_url)
    for model in re.findall(r'"model": "([^"]+)"|model="([^"]+)"', text):
        assert served in model, f"the README asks for model {model}, the server serves {served!r}"
    if example.kind == "curl":
        out = _run([*shlex.split(text), "-sS", "--fail-with-body", "--max-time", str(TIMEOUT_S)], tmp_path)
        return _text_of_response(out)
    if example.kind == "python":
        script = tmp_path / "example.py"
        script.write_text(text)
        return _run([sys.executable, str(script)], tmp_path)
    if example.kind == "complete":
        return _run([*rnnserve_command(), *shlex.split(text)[1:]], tmp_path)
    out = _run([*rnnserve_command(), *shlex.split(text)[1:]], tmp_path, stdin="add two numbers\n")
    assert out.startswith(f"chatting with {served}"), out
    return out.split("> ", 1)[1]


def test_readme_examples_run(server: LiveServer, tmp_path: Path) -> None:
    served = json.loads(_run(["curl", "-sS", f"{server.base_url}/v1/models"], tmp_path))["data"][0]["id"]
    examples = readme_examples(README.read_text())
    folders = [tmp_path / str(i) for i in range(len(examples))]
    for folder in folders:
        folder.mkdir()
    # Side by side, as several newcomers would: the server batches them, the clients start together.
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(_run_example, examples, [server] * len(examples), [served] * len(examples), folders))
    for example, generated in zip(examples, outputs):
        assert generated.strip(), f"{example.kind} example produced no text:\n{example.text}"
