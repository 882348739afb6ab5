"""Every ``rnnserve`` command speaks the same way: one line ``rnnserve: error: ...`` for a user
mistake (a missing optional package included), help texts with defaults and without ``code``
marks, and the API key from the environment in every client (complete, chat, bench serve, bench chat)."""

from __future__ import annotations

import io
import pkgutil
import sys

import pytest

import rnnserve.bench
from rnnserve.cli import main
from rnnserve.clients import chat
from rnnserve.console import OPTIONAL_PACKAGES
from tests.bench.stub_openai import stub_server


def _one_error_line(err: str) -> str:
    assert err.startswith("rnnserve: error: ") and err.count("\n") == 1, err
    return err


def test_bench_help_lists_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    names = [m.name for m in pkgutil.iter_modules(rnnserve.bench.__path__)]
    assert {"throughput", "serve", "compare"} <= set(names)
    for name in names:
        assert f"\n  {name} " in out
    assert main(["bench"]) == 2  # no benchmark named: the same list, as a usage error
    assert "compare" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "package"),
    [
        (["bench", "serve", "--base-url", "http://127.0.0.1:9"], "httpx"),
        (["bench", "compare", "--size", "tiny"], "matplotlib"),
        (["complete", "hello"], "httpx"),
        (["chat"], "openai"),
    ],
)
def test_a_missing_optional_package_is_one_line(
    argv: list[str], package: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    for name in ("rnnserve.bench.serve", "rnnserve.bench.compare"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(argv) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert f"needs the {package} package" in err and f"[{OPTIONAL_PACKAGES[package]}]" in err
    assert "no benchmark named" not in err


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["complete"], ["chat"], ["bench", "serve"], ["bench", "throughput"], ["bench", "compare"]],
)
def test_help_shows_defaults_and_no_code_marks(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "``" not in out
    assert "(default: " in out or "default: " in out
    assert "(default: True)" not in " ".join(out.split())  # a flag without a value shows no default


def test_serve_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 64)", "default: 2048", "default: 8000", "default: 127.0.0.1", "(default: auto)"):
        assert text in out


def test_every_client_sends_the_api_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RNNSERVE_API_KEY", "sekret")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with stub_server(token_delay_s=0.0) as stub:
        assert main(["complete", "--base-url", stub.url, "--max-tokens", "3", "hi"]) == 0
        assert chat.main(["--base-url", stub.url, "--max-tokens", "2"], read=_scripted(["hi"]), out=io.StringIO()) == 0
        argv = ["bench", "serve", "--base-url", stub.url, "--num-prompts", "2", "--input-len", "3", "--output-len", "2"]
        assert main(argv) == 0
        argv = ["bench", "chat", "--base-url", stub.url, "--conversations", "1", "--turns", "1", "--answer-len", "2"]
        assert main([*argv, "--user-len", "3"]) == 0
    assert stub.authorizations and set(stub.authorizations) == {"Bearer sekret"}
    # complete took the server root without /v1, as chat does, and printed the stream.
    assert capsys.readouterr().out.startswith("tok0 tok1 tok2 \n")
    assert len(stub.requests) == 1 + 1 + 2 + 1


def test_complete_reports_an_http_error_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with stub_server(token_delay_s=0.0) as stub:
        assert main(["complete", "--base-url", stub.url + "/v1", "--model", "nope", "hi"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "HTTP 404" in err and "no such model" in err


@pytest.mark.parametrize("argv", [["bench", "serve", "--num-prompts", "1"], ["bench", "chat", "--turns", "1"]])
def test_bench_reports_a_refused_api_key_in_one_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RNNSERVE_API_KEY", "wrong")
    with stub_server(token_delay_s=0.0, api_key="right") as stub:
        assert main([*argv, "--base-url", stub.url]) == 2
    err = _one_error_line(capsys.readouterr().err)
    # The server's answer, not "cannot reach" and an httpx status dump over two lines.
    assert "/v1/models: HTTP 401: missing or invalid API key" in err and "cannot reach" not in err
    assert stub.requests == []


def _scripted(lines: list[str]):
    it = iter(lines)

    def read(_: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read
