"""The chat client's loop (history, /reset, Ctrl-C stops only the answer) and the small Python
client, against the stub OpenAI server; neither imports torch."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable

import openai

from rnnserve.clients import chat
from rnnserve.clients.client import Client
from tests.bench.stub_openai import stub_server


def scripted(lines: list[str]) -> Callable[[str], str]:
    """An ``input`` replacement: the lines in order, then Ctrl-D."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


class InterruptOnce(io.StringIO):
    """Terminal output where the user presses Ctrl-C when ``trigger`` is about to be shown."""

    def __init__(self, trigger: str) -> None:
        super().__init__()
        self.trigger = trigger

    def write(self, s: str) -> int:
        if self.trigger and s == self.trigger:
            self.trigger = ""
            raise KeyboardInterrupt
        return super().write(s)


def test_history_reset_and_system_prompt() -> None:
    with stub_server(token_delay_s=0.0) as stub:
        out = io.StringIO()
        rc = chat.main(
            ["--base-url", stub.url, "--system", "be brief", "--max-tokens", "3"],
            read=scripted(["hello", "again", "/reset", "third", "/bogus", "", "/exit", "never sent"]),
            out=out,
        )
        reqs = list(stub.requests)
    assert rc == 0
    text = out.getvalue()
    assert "chatting with stub-model" in text
    assert text.count("tok0 tok1 tok2 \n") == 3
    assert "(conversation reset)" in text and "unknown command '/bogus'" in text
    assert len(reqs) == 3
    assert all(r["stream"] and r["max_tokens"] == 3 and r["model"] == "stub-model" for r in reqs)
    assert [m["role"] for m in reqs[0]["messages"]] == ["system", "user"]
    # the second turn carries the first exchange
    assert reqs[1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "tok0 tok1 tok2 "},
        {"role": "user", "content": "again"},
    ]
    # after /reset only the system prompt remains
    assert reqs[2]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "third"}]


def test_ctrl_c_stops_the_answer_not_the_program() -> None:
    with stub_server(token_delay_s=0.01) as stub:
        out = InterruptOnce(trigger="tok2 ")
        rc = chat.main(["--base-url", stub.url + "/v1", "--max-tokens", "6"], read=scripted(["one", "two"]), out=out)
        reqs = list(stub.requests)
    assert rc == 0
    text = out.getvalue()
    assert "tok0 tok1 \n[stopped]\n" in text
    assert "tok0 tok1 tok2 tok3 tok4 tok5 \n" in text  # the next question is answered in full
    # what was shown of the stopped answer is in the history of the next request
    assert reqs[1]["messages"][1] == {"role": "assistant", "content": "tok0 tok1 "}


def test_session_send_and_errors() -> None:
    with stub_server(token_delay_s=0.0) as stub:
        client = openai.OpenAI(base_url=stub.url + "/v1", api_key="x", max_retries=0)
        session = chat.ChatSession(client=client, model="missing", max_tokens=2)
        out = io.StringIO()
        chat.repl(session, scripted(["hi"]), out)
        assert "[error:" in out.getvalue()
        assert session.messages == []  # the failed turn is not kept
        session.model = chat.default_model(client)
        pieces: list[str] = []
        answer, interrupted = session.send("hi", pieces.append)
    assert (answer, interrupted) == ("tok0 tok1 ", False)
    assert pieces == ["tok0 ", "tok1 "]


def test_unreachable_server(capsys) -> None:
    from tests.bench.stub_openai import free_port

    rc = chat.main(["--base-url", f"http://127.0.0.1:{free_port()}"], read=scripted([]), out=io.StringIO())
    assert rc == 2 and "cannot list models" in capsys.readouterr().err


def test_python_client() -> None:
    with stub_server(token_delay_s=0.0) as stub, Client(stub.url + "/v1") as c:
        assert c.health()
        assert c.models() == ["stub-model"]
        assert c.complete("a b", max_tokens=2) == "tok0 tok1 "
        assert c.chat([{"role": "user", "content": "x"}], max_tokens=1) == "tok0 "
        assert list(c.stream_complete("a", max_tokens=3)) == ["tok0 ", "tok1 ", "tok2 "]
        assert "".join(c.stream_chat([{"role": "user", "content": "x"}], max_tokens=2)) == "tok0 tok1 "


def test_clients_do_not_import_torch() -> None:
    code = "import sys, rnnserve.clients.chat, rnnserve.clients.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
