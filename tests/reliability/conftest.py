"""The reliability suite: the real engine and a tiny random Mamba behind real sockets on 127.0.0.1.

``serve_in_thread`` runs an app from ``build_app`` under the same uvicorn server ``rnnserve serve``
uses (read timeouts, drain), in a thread of the test process, so tests can start many concurrent
clients and still reach into the app (admission counters, fault injection).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from rnnserve.config import ServerConfig
from rnnserve.server.run import DrainingServer, make_protocol
from tests.server.conftest import build_model_dir


@pytest.fixture(scope="session")
def rel_model_dir(neox_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("reliability") / "tiny-mamba", neox_tokenizer_dir)


@contextmanager
def serve_in_thread(app: FastAPI, cfg: ServerConfig | None = None) -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1; yields its base URL; stops it afterwards."""
    cfg = cfg or ServerConfig()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app.state.edge,  # as run() serves it
        log_level="warning",
        proxy_headers=False,
        http=make_protocol(cfg.read_timeout, app.state.edge),  # as run() serves it
        timeout_keep_alive=cfg.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=cfg.shutdown_timeout + 5,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, app.state.admission, cfg.shutdown_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def engine_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Wait until no request runs or waits and no slot is held; the gauges as last read."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "rnnserve:state_pool_slots_used")
    deadline = time.monotonic() + timeout
    while True:
        values = {}
        for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
            name = line.split("{", 1)[0]
            if name in names:
                values[name] = float(line.rsplit(" ", 1)[1])
        if all(values.get(n) == 0 for n in names) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)
