"""``rnnserve serve`` refuses an impossible device, kernel backend or address before it loads the
model: one line naming the flag, exit status 2, and the model loader never called."""

from __future__ import annotations

import socket

import pytest
import torch

from rnnserve import cli
from rnnserve.config import ConfigError, ModelConfig, ServerConfig
from rnnserve.preflight import bind_socket, check_device

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve(*_: object) -> int:
        raise AssertionError("the model was loaded although start-up should have refused the flags")

    monkeypatch.setattr(cli, "serve", serve)


def _one_error_line(err: str) -> str:
    assert err.startswith("rnnserve: error: ") and err.count("\n") == 1, err
    return err


def test_a_taken_port_is_refused_before_the_load(no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"--port {port}" in err and "already in use" in err


def test_bind_socket_holds_the_port() -> None:
    sock = bind_socket(ServerConfig(host="127.0.0.1", port=0))
    try:
        port = sock.getsockname()[1]
        assert port > 0
        # Bound and listening: nobody else can take the port while the model loads.
        sock.listen()
        with pytest.raises(ConfigError, match="already in use"):
            bind_socket(ServerConfig(host="127.0.0.1", port=port))
    finally:
        sock.close()


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only refusal")
def test_triton_kernels_without_cuda(
    no_model_load: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["serve", "--kernels", "triton", "--port", "0"]) == 2
    assert "--kernels triton needs a CUDA device" in _one_error_line(capsys.readouterr().err)
    # Under Triton's interpreter (what the kernel tests use) the CPU may run them.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_device(ModelConfig(kernels="triton", device="cpu"))


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only refusal")
def test_cuda_device_without_cuda(no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--device", "cuda", "--port", "0"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "--device cuda" in err and "--device cpu" in err


def test_a_device_that_is_not_one(no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--device", "gpu0", "--port", "0"]) == 2
    assert "--device 'gpu0' is not a device" in _one_error_line(capsys.readouterr().err)


def test_config_errors_name_the_flag(no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--max-num-seqs", "0"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "--max-num-seqs must be >= 1" in err and "max_num_seqs" not in err
    assert cli.flag_names("max_graph_batch_size must be >= 1") == "--max-graph-batch-size must be >= 1"
    assert cli.flag_names("port must be in 0..65535") == "--port must be in 0..65535"
    assert cli.flag_names("compile_cpu_decode needs a CPU") == "--compile needs a CPU"
    # Prose keeps its words: only a leading field name or a snake_case one is a flag.
    assert cli.flag_names("the model has no port") == "the model has no port"


def test_an_incomplete_default_model_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import rnnserve.models.default

    def broken() -> None:
        raise RuntimeError("the embedded default model is incomplete (config.json missing): reinstall rnnserve")

    monkeypatch.setattr(rnnserve.models.default, "ensure_default_model", broken)
    assert cli.main(["serve", "--port", "0"]) == 1
    assert "reinstall rnnserve" in _one_error_line(capsys.readouterr().err)
