"""CLI parsing: every serve flag lands in its config field; sizes with suffixes; dispatch errors."""

from __future__ import annotations

import argparse

import pytest

from rnnserve.cli import build_parser, configs_from_args, main, parse_bytes


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("2GiB", 2 * 1024**3), ("512MiB", 512 * 1024**2), ("1.5GB", 1_500_000_000), ("64k", 64_000)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "2XB", "-1", "0"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_every_serve_flag_maps_to_its_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RNNSERVE_API_KEY", raising=False)
    flags = (
        "serve --model /m --served-model-name nm --dtype bfloat16 --device cpu --kernels torch --host 0.0.0.0 "
        "--port 9001 --max-num-seqs 5 --state-memory 2GiB --max-num-batched-tokens 777 --max-model-len 900 "
        "--api-key k --chat-template t.jinja --tokenizer gpt-neox-20b --enforce-eager --max-request-bytes 1MiB "
        "--log-level debug --compile --max-graph-batch-size 64"
    )
    args = build_parser().parse_args(flags.split(" "))
    c = configs_from_args(args)
    assert (c.model.model, c.model.served_model_name, c.model.dtype, c.model.device, c.model.kernels) == (
        "/m",
        "nm",
        "bfloat16",
        "cpu",
        "torch",
    )
    assert (c.model.tokenizer, c.model.chat_template) == ("gpt-neox-20b", "t.jinja")
    assert (c.pool.max_num_seqs, c.pool.state_memory) == (5, 2 * 1024**3)
    assert (c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens, c.scheduler.max_model_len) == (5, 777, 900)
    assert (c.runner.enforce_eager, c.runner.compile_cpu_decode, c.runner.max_graph_batch_size) == (True, True, 64)
    assert (c.server.host, c.server.port, c.server.api_key) == ("0.0.0.0", 9001, "k")
    assert (c.server.max_request_bytes, c.server.log_level) == (1024**2, "debug")


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSERVE_API_KEY", "from-env")
    assert configs_from_args(build_parser().parse_args(["serve"])).server.api_key == "from-env"


def test_dispatch_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert main(["bench", "no_such_bench"]) == 2
    assert "no benchmark named" in capsys.readouterr().err
    assert main([]) == 2


def test_bench_and_chat_dispatch_to_their_modules(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench", "throughput", "--help"], ["chat", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_serve_reports_a_missing_model_clearly(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rnnserve: error:") and "nowhere" in err and err.count("\n") == 1


def test_serve_refuses_a_prefix_cache_dir_with_ray(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before Ray is imported or a model loaded: one line naming both flags.
    assert main(["serve", "--ray", "--prefix-cache-dir", str(tmp_path / "cache"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnserve: error:") and "--prefix-cache-dir" in err and "--ray" in err
    assert err.count("\n") == 1
