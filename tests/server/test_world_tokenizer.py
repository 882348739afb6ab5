"""The RWKV world tokenizer: same ids as the rwkv package's own TRIE_TOKENIZER, lossless round trips on
mixed scripts and emoji, byte-level decoding of partial characters, no torch import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rnnserve.server.world_tokenizer import RwkvWorldTokenizer, default_vocab_file

TEXTS = [
    "Hello, world!",
    "Grüße aus Köln — naïve café, 12.5 °C",
    "日本語のテキストと中文混合，还有한국어도 있습니다。",
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 🇫🇷 ✔️",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # \\u00e9\r\n",
    "   leading and trailing spaces   ",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tok() -> RwkvWorldTokenizer:
    return RwkvWorldTokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: RwkvWorldTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_matches_package_tokenizer(tok: RwkvWorldTokenizer) -> None:
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    ref = TRIE_TOKENIZER(default_vocab_file())
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
    assert tok.encode("Hello") == [33155]  # one whole-word token


def test_partial_utf8_and_special_ids(tok: RwkvWorldTokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1  # the emoji is split into byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"  # an incomplete character is replaced, not raised
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "🎉".encode()
    assert tok.eos_token_id == 0 and tok.vocab_size == 65536
    assert tok.decode([0]) == "" and tok.id_to_token(0) == "<|endoftext|>"
    assert tok.decode([65535]) == ""  # inside the embedding but not in the vocabulary
    assert tok.id_to_token(33155) == "Hello"
    assert tok.encode("") == []


def test_custom_vocab_file(tmp_path) -> None:
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'ab' 2", "258 b'\\xe4\\xb8' 2"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = RwkvWorldTokenizer(path)
    assert tok.encode("abab") == [257, 257]
    assert tok.encode("中") == [258, 0xAD + 1]  # longest match on bytes, then the single-byte token
    assert tok.decode([258, 0xAD + 1]) == "中"
    bad = tmp_path / "bad.txt"
    bad.write_text("1 __import__('os') 1\n", encoding="utf-8")
    with pytest.raises(ValueError):
        RwkvWorldTokenizer(bad)


def test_does_not_import_torch() -> None:
    code = "import sys, rnnserve.server.world_tokenizer as w; w.RwkvWorldTokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("trim", [True, False])
def test_chat_template(trim: bool) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    template = env.from_string(RwkvWorldTokenizer.chat_template)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!\n\n\n\nTwo paragraphs.\r\n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert text == ("System: Be brief.\n\nUser: Hi!\nTwo paragraphs.\n\nAssistant: Hello.\n\nUser: Again\n\nAssistant:")
    assert template.render(messages=messages[:1], add_generation_prompt=False) == "System: Be brief.\n\n"
