"""``rnnserve chat``: a streaming terminal chat with any OpenAI-compatible server.

Keeps the conversation history, streams the answer as it comes, ``/reset`` starts over (keeping
the system prompt), ``/exit`` or Ctrl-D quits, and Ctrl-C stops the current answer (what was
already shown stays in the history) without leaving the program. Uses the ``openai`` package only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from rnnserve.console import ArgumentParser, api_key_from_env, print_error, require, v1_url

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops an answer"


@dataclass
class ChatSession:
    """A conversation with one model: the message history and how to stream the next answer."""

    client: object  # openai.OpenAI
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, on_text: Callable[[str], None]) -> tuple[str, bool]:
        """Stream the answer to ``text``, calling ``on_text`` with each piece. Returns the answer and
        whether it was interrupted (Ctrl-C). Either way what was shown joins the history."""
        self.messages.append({"role": "user", "content": text})
        extra: dict = {}
        if self.temperature is not None:
            extra["temperature"] = self.temperature
        if self.max_tokens is not None:
            extra["max_tokens"] = self.max_tokens
        pieces: list[str] = []
        interrupted = False
        stream = None
        try:
            stream = self.client.chat.completions.create(model=self.model, messages=self.messages, stream=True, **extra)
            for chunk in stream:
                for choice in chunk.choices:
                    piece = choice.delta.content or ""
                    if piece:
                        on_text(piece)
                        pieces.append(piece)
        except KeyboardInterrupt:
            interrupted = True
        except Exception:
            # The request failed: drop the unanswered user turn so a retry does not send it twice.
            self.messages.pop()
            raise
        finally:
            if stream is not None:
                stream.close()
        answer = "".join(pieces)
        if answer:
            self.messages.append({"role": "assistant", "content": answer})
        else:
            self.messages.pop()  # stopped before any text: forget the question too
        return answer, interrupted


def default_model(client: object) -> str:
    models = list(client.models.list())
    if not models:
        raise RuntimeError("the server lists no model; pass --model")
    return models[0].id


def repl(session: ChatSession, read: Callable[[str], str], out: TextIO) -> int:
    """The chat loop: ``read`` is ``input`` in a terminal (raises EOFError on Ctrl-D)."""
    import openai

    out.write(f"chatting with {session.model} — {HELP}\n")
    while True:
        try:
            text = read("> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")  # Ctrl-C at the prompt clears the line; /exit or Ctrl-D quits
            continue
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text!r}; {HELP}\n")
            continue

        def show(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            _, interrupted = session.send(text, show)
        except openai.OpenAIError as exc:
            out.write(f"\n[error: {exc}]\n")
            continue
        out.write("\n[stopped]\n" if interrupted else "\n")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rnnserve chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a /v1 suffix is fine)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--api-key", default=None, help="default: $RNNSERVE_API_KEY, else $OPENAI_API_KEY")
    return p


def openai_base_url(base_url: str) -> str:
    return v1_url(base_url)


def main(argv: list[str] | None = None, read: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    require("openai", "rnnserve chat")
    import openai

    out = out or sys.stdout
    # openai refuses an empty key; a server without --api-key ignores whatever is sent.
    api_key = args.api_key or api_key_from_env() or "EMPTY"
    client = openai.OpenAI(base_url=openai_base_url(args.base_url), api_key=api_key, max_retries=0)
    try:
        model = args.model or default_model(client)
    except (openai.OpenAIError, RuntimeError) as exc:
        print_error(f"cannot list models at {openai_base_url(args.base_url)}: {exc}")
        return 2
    session = ChatSession(
        client=client, model=model, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens
    )
    return repl(session, read, out)


if __name__ == "__main__":
    sys.exit(main())
