"""Tokenizer loading (model folder, named tokenizers, none) and chat templates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rnnserve.server.tokenizer import (
    NEOX_NAME,
    ChatTemplateError,
    HFTokenizer,
    TokenizerLoadError,
    load_tokenizer,
)

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_folder_tokenizer_round_trips_and_has_no_template_by_default(neox_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_id == 0
    assert tok.vocab_size == 50277
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_overrides_and_renders(neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    tok = load_tokenizer(neox_tokenizer_dir, chat_template=str(f))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "[system]be brief[user]hi[assistant]"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "[system]be brief[user]hi"
    cont = [*msgs, {"role": "assistant", "content": "Hel"}]
    assert tok.apply_chat_template(cont, continue_final_message=True).endswith("[assistant]Hel")


def test_template_raise_exception_becomes_a_chat_template_error(neox_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(neox_tokenizer_dir, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_in_the_folder_is_picked_up(neox_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(neox_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "[user]q[assistant]"


def test_named_neox_tokenizer_and_token_bytes_of_partial_characters() -> None:
    tok = load_tokenizer(None, NEOX_NAME)
    ids = tok.encode("語")
    assert len(ids) == 2
    # Each token holds part of the 3-byte character: its raw bytes, not U+FFFD's.
    assert [b for i in ids for b in tok.token_bytes(i)] == list("語".encode())
    assert tok.token_bytes(tok.encode(" world")[0]) == list(b" world")


def test_no_tokenizer_and_bad_names(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(None) is None
    with pytest.raises(TokenizerLoadError, match="neither a folder"):
        load_tokenizer(tmp_path, "no-such-tokenizer")
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path, NEOX_NAME, chat_template=str(tmp_path / "missing.jinja"))


def test_world_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rnnserve.server import tokenizer as tokenizer_module
    from rnnserve.server.detokenizer import IncrementalDetokenizer
    from rnnserve.server.tokenizer import WORLD_NAME, WORLD_VOCAB_FILE, WorldTokenizer

    tok = load_tokenizer(None, WORLD_NAME)
    assert isinstance(tok, WorldTokenizer)
    assert tok.eos_token_id == 0 and tok.vocab_size == 65536 and tok.chat_template is None
    text = "héllo wörld 日本語 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [b for i in ids for b in tok.token_bytes(i)] == list(text.encode())
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])

    # A model folder holding the world vocabulary file is served with the world tokenizer, from that file.
    seen: list[Path | None] = []
    monkeypatch.setattr(tokenizer_module, "_load_world", lambda folder, template: seen.append(folder) or tok)
    (tmp_path / WORLD_VOCAB_FILE).write_text("")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_tokenizer(tmp_path) is tok and seen == [tmp_path]
