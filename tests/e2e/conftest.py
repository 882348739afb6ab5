"""A live ``rnnserve serve`` subprocess on 127.0.0.1 and a free port, one per test module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import build_model_dir

API_KEY = "e2e-key"
MODEL_NAME = "tiny-mamba"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(args: list[str], log: Path, timeout: float = 120.0, env: dict[str, str] | None = None) -> LiveServer:
    port = free_port()
    cmd = [sys.executable, "-m", "rnnserve", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    full_env.pop("RNNSERVE_API_KEY", None)
    env = {**full_env, **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rnnserve serve exited with {proc.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"rnnserve serve did not become healthy in {timeout}s:\n{server.log_text()}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


@pytest.fixture(scope="session")
def e2e_model_dir(neox_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("e2e") / "tiny-mamba", neox_tokenizer_dir)


@pytest.fixture(scope="module")
def live_server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    server = start_server(
        [
            "--model",
            str(e2e_model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--api-key",
            API_KEY,
            "--max-num-seqs",
            "4",
            # 12 concurrent streams must all be taken (most wait for a slot); the default bound is 4 + 4.
            "--max-queued-requests",
            "16",
            "--max-request-bytes",
            "64KiB",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ],
        log,
    )
    try:
        yield server
    finally:
        stop_server(server)
