"""The RWKV "world" tokenizer: a greedy longest-match trie over byte strings (``rwkv_vocab_v20230424``,
65529 entries), as used by RWKV world models. Id 0 is the end-of-text token and has no bytes.

Wraps the ``rwkv`` package's ``TRIE_TOKENIZER`` (its trie and greedy encoder), but reads the vocabulary
file itself with ``ast.literal_eval``: the package ``eval``s every line, and the file may come from a
downloaded model folder. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import ast
import importlib.resources
import os

from rwkv.rwkv_tokenizer import TRIE, TRIE_TOKENIZER

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
EOS_TOKEN = "<|endoftext|>"

# The chat format RWKV world models are trained on: "System: …", "User: …", "Assistant: …" turns
# separated by a blank line (so blank lines inside a message are collapsed to one newline, as
# BlinkDL's chat demo does), and the prompt ends with "Assistant:" without a trailing space. Only
# {{ }} emit text, so the result is the same with or without trim_blocks / lstrip_blocks.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
{%- set content = message['content'] | replace('\r\n', '\n') | replace('\n\n', '\n') | replace('\n\n', '\n')
    | replace('\n\n', '\n') | trim -%}
{%- if message['role'] == 'system' -%}{{- 'System: ' + content + '\n\n' -}}
{%- elif message['role'] == 'user' -%}{{- 'User: ' + content + '\n\n' -}}
{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + content + '\n\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"""


def default_vocab_file() -> str:
    """The world vocabulary shipped in the ``rwkv`` package."""
    return str(importlib.resources.files("rwkv") / VOCAB_FILE_NAME)


def _read_vocab(path: str) -> dict[int, bytes]:
    """Lines ``<id> <python str or bytes literal> <byte length>`` -> {id: bytes}."""
    vocab: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                idx = int(line[: line.index(" ")])
                literal = ast.literal_eval(line[line.index(" ") : line.rindex(" ")].strip())
                length = int(line[line.rindex(" ") :])
            except (ValueError, SyntaxError) as exc:
                raise ValueError(f"{path}:{lineno}: not a world-vocabulary line: {line[:80]!r}") from exc
            token = literal.encode("utf-8") if isinstance(literal, str) else literal
            if not isinstance(token, bytes) or len(token) != length:
                raise ValueError(f"{path}:{lineno}: token {literal!r} does not have the stated length {length}")
            vocab[idx] = token
    return vocab


class RwkvWorldTokenizer:
    """encode(text) -> ids, decode(ids) -> text (invalid UTF-8 replaced), decode_bytes(ids) -> bytes."""

    eos_token_id: int = 0
    vocab_size: int = 65536  # the world models' embedding size; ids without an entry decode to b""
    chat_template: str = CHAT_TEMPLATE

    def __init__(self, vocab_file: str | os.PathLike[str] | None = None) -> None:
        path = str(vocab_file) if vocab_file is not None else default_vocab_file()
        idx2token = _read_vocab(path)
        tokens = set(idx2token.values())
        if not all(bytes([b]) in tokens for b in range(256)):
            # The greedy matcher needs every single byte, or some inputs cannot be encoded at all.
            raise ValueError(f"{path}: the vocabulary lacks some single-byte tokens")
        # TRIE_TOKENIZER's constructor evals the file; build the same object from the parsed entries.
        tok = TRIE_TOKENIZER.__new__(TRIE_TOKENIZER)
        tok.idx2token = idx2token
        tok.token2idx = {t: i for i, t in idx2token.items()}
        tok.root = TRIE()
        for t, i in tok.token2idx.items():
            tok.root.add(t, val=(t, i))
        self._tok = tok
        self.vocab_file = path

    def encode(self, text: str) -> list[int]:
        return self._tok.encodeBytes(text.encode("utf-8")) if text else []

    def decode_bytes(self, ids: list[int]) -> bytes:
        get = self._tok.idx2token.get
        return b"".join(get(int(i), b"") for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._tok.idx2token.get(int(token_id), b"")

    def id_to_token(self, token_id: int) -> str:
        if token_id == self.eos_token_id:
            return EOS_TOKEN
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size
