"""Token ids -> text, one step at a time, and stop strings.

``IncrementalDetokenizer`` decodes a short window of ids (the last emitted ones as context, so
tokenizers that drop a leading space at the start of a decode still get it right) and only emits
text once it no longer ends in U+FFFD: a multi-byte UTF-8 character split over several tokens comes
out whole, with the token that completes it.

``StopMatcher`` finds stop strings in the generated text, also when one spans token boundaries, and
holds back any tail that could be the start of a stop string, so a stop string is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rnnserve.server.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt ids decoded as context ahead of the first generated token.
_PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # ids = context (a prompt tail) + generated ids; text for ids[prefix:read] was emitted already.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete ("" while a character is still partial)."""
        if not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """At the end of the sequence: whatever is still pending, partial characters included."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read
        self._read = len(self._ids)
        return full_text[len(prefix_text) :]


@dataclass(frozen=True)
class StopMatch:
    stop: str
    index: int  # where it starts in the full text


class StopMatcher:
    """Feeds text deltas; returns what is safe to emit, and the stop string once one matches."""

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._include = include_stop_str_in_output
        self.text = ""  # everything generated so far (cut at the stop string once matched)
        self.emitted = 0  # characters of ``text`` handed out
        self.match: StopMatch | None = None

    def _holdback(self) -> int:
        # The longest tail of the text that is a proper prefix of a stop string.
        text = self.text
        for n in range(min(self._max_len - 1, len(text) - self.emitted), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def feed(self, delta: str, check: bool = True) -> str:
        """Add generated text; return the part that can be emitted now.

        ``check=False`` (before ``min_tokens`` are out) lets stop strings through, as vLLM does.
        """
        if self.match is not None or not delta:
            return ""
        # A match can start at most len(stop) - 1 characters back, and never in text already out.
        search_from = max(self.emitted, len(self.text) - self._max_len + 1)
        self.text += delta
        if not self._stops or not check:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        best: StopMatch | None = None
        for s in self._stops:
            idx = self.text.find(s, search_from)
            if idx >= 0 and (best is None or idx < best.index):
                best = StopMatch(s, idx)
        if best is not None:
            self.match = best
            end = best.index + (len(best.stop) if self._include else 0)
            self.text = self.text[:end]
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        safe = len(self.text) - self._holdback()
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """At the end without a match: the held-back tail."""
        if self.match is not None:
            return ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
