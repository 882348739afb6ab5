"""Which engine replica a request should go to: the one that served its conversation last.

A recurrent model's state (and, with the prefix cache, its snapshots) lives on the replica that
computed it, so a conversation's next turn is cheapest there. A request names its conversation with
``session_id`` (an extra body field) or the OpenAI ``user`` field; a request that names none is
matched by its prompt: it continues a conversation when it starts with the whole prompt of an earlier
request (its first ``PREFIX_TOKENS`` tokens when that prompt was longer). That is exactly the case
where the earlier request's state can be reused: turn 2's prompt is turn 1's prompt, its answer and
the new message.

Pure Python (no Ray): the request router in ``rnnserve.deploy.ray_serve`` holds one table.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PREFIX_TOKENS = 256  # an anonymous conversation is keyed by at most this many leading prompt tokens

_MOD = (1 << 61) - 1  # a Mersenne prime: polynomial prefix hashes with few collisions
_BASE = 1_000_003

Outcome = Literal["hit", "miss", "new"]


def prefix_hashes(token_ids: Sequence[int], limit: int = PREFIX_TOKENS) -> list[int]:
    """``out[n]`` hashes ``token_ids[:n]`` for n in 0..min(len, limit) (one pass, not one per prefix)."""
    out = [0]
    h = 0
    for t in token_ids[:limit]:
        h = (h * _BASE + int(t) + 1) % _MOD
        out.append(h)
    return out


@dataclass(frozen=True)
class Conversation:
    """What the router knows of a request: its named conversation, if any, and its prompt."""

    session: str | None  # "session:<session_id>" or "user:<user>"; None: anonymous
    prompt_token_ids: Sequence[int]


class AffinityTable:
    """Conversation -> the replica that served it last, least recently used dropped past ``max_entries``.

    Keys are ``("s", session)`` for named conversations and ``("p", n, hash of the first n tokens)``
    for anonymous ones. ``lookup`` finds an anonymous prompt's longest recorded prefix by checking
    only the prefix lengths that some entry has (at most ``PREFIX_TOKENS`` of them).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, str] = OrderedDict()
        self._lengths: Counter[int] = Counter()  # prefix length -> anonymous entries of that length

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, conv: Conversation) -> str | None:
        """The replica that served this conversation last, or None for a new one."""
        key = self._find(conv)
        return None if key is None else self._entries[key]

    def record(self, conv: Conversation, replica: str) -> Outcome:
        """Note that ``replica`` serves this request; whether that was its conversation's replica.
        The request's entry replaces the one it matched (turn 2's prompt supersedes turn 1's)."""
        found = self._find(conv)
        previous = None if found is None else self._drop(found)
        if conv.session is not None:
            key: tuple = ("s", conv.session)
        else:
            hashes = prefix_hashes(conv.prompt_token_ids)
            key = ("p", len(hashes) - 1, hashes[-1])
            self._lengths[key[1]] += 1
        self._entries[key] = replica
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))
        if previous is None:
            return "new"
        return "hit" if previous == replica else "miss"

    def _drop(self, key: tuple) -> str:
        if key[0] == "p":
            self._lengths[key[1]] -= 1
            if not self._lengths[key[1]]:
                del self._lengths[key[1]]
        return self._entries.pop(key)

    def _find(self, conv: Conversation) -> tuple | None:
        if conv.session is not None:
            key = ("s", conv.session)
            return key if key in self._entries else None
        hashes = prefix_hashes(conv.prompt_token_ids)
        for n in sorted((n for n in self._lengths if n < len(hashes)), reverse=True):
            key = ("p", n, hashes[n])
            if key in self._entries:
                return key
        return None
