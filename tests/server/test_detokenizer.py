"""Incremental detokenizer (multi-byte characters split over tokens) and stop-string matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.server.detokenizer import IncrementalDetokenizer, StopMatcher
from rnnserve.server.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

TEXT = "héllo wörld 日本語 🙂 naïve — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"


@pytest.fixture(scope="module")
def tok(neox_tokenizer_dir: Path) -> Tokenizer:
    t = load_tokenizer(neox_tokenizer_dir)
    assert isinstance(t, HFTokenizer)
    return t


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), step: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.step(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_equals_full_decode_and_never_emits_partial_characters(tok: Tokenizer, step: int) -> None:
    ids = tok.encode(TEXT)
    # The test is only meaningful if some character really is split over tokens.
    assert any("\ufffd" in tok.token_str(i) for i in ids)
    deltas = _stream(tok, ids, step=step)
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_prompt_context_keeps_leading_spaces(tok: Tokenizer) -> None:
    prompt = tok.encode("The answer is")
    ids = tok.encode(" forty two")
    assert "".join(_stream(tok, ids, prompt)) == " forty two"


def test_flush_emits_a_dangling_partial_character(tok: Tokenizer) -> None:
    ids = tok.encode("語")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.step(ids[:1]) == ""
    assert detok.flush() == tok.decode(ids[:1])


def _feed(matcher: StopMatcher, pieces: list[str]) -> str:
    out = [matcher.feed(p) for p in pieces]
    if matcher.match is None:
        out.append(matcher.flush())
    return "".join(out)


def test_stop_string_across_piece_boundaries_is_never_emitted() -> None:
    m = StopMatcher(["STOP"])
    emitted = []
    for piece in ["abc S", "T", "O", "P tail"]:
        emitted.append(m.feed(piece))
    assert emitted == ["abc ", "", "", ""]
    assert m.match is not None and m.match.stop == "STOP"
    assert m.text == "abc "


def test_held_back_prefix_is_released_when_it_does_not_complete() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("xx ST") == "xx "
    assert m.feed("ART") == "START"
    assert m.match is None
    assert m.flush() == ""


def test_earliest_of_several_stops_wins_and_held_tail_flushes_at_the_end() -> None:
    m = StopMatcher(["world", "lo w"])
    assert _feed(m, ["hel", "lo wor", "ld"]) == "hel"
    assert m.match is not None and m.match.stop == "lo w"
    m2 = StopMatcher(["\n\n"])
    assert _feed(m2, ["a\n"]) == "a\n"


def test_include_stop_str_in_output() -> None:
    m = StopMatcher(["END"], include_stop_str_in_output=True)
    assert _feed(m, ["the E", "ND and more"]) == "the END"


def test_no_stops_passes_through() -> None:
    m = StopMatcher([])
    assert [m.feed(p) for p in ["a", "b"]] == ["a", "b"]


def test_stop_strings_are_not_checked_before_min_tokens() -> None:
    m = StopMatcher(["ab"])
    assert m.feed("xab", check=False) == "xab"
    assert m.feed("a", check=True) == ""  # may be the start of "ab"
    assert m.feed("b tail", check=True) == ""
    assert m.text == "xab" and m.match is not None and m.match.index == 3
    late = StopMatcher(["ab"])
    assert late.feed("xa", check=False) == "xa"
    # "ab" straddles text already out: it cannot be taken back, so it does not match there.
    assert late.feed("b", check=True) == "b" and late.match is None
