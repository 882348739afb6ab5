"""Admission control and drain: how much work the server takes, and how it lets go of it.

Every HTTP generation request becomes ``fan-out = prompts x n`` engine requests. ``Admission``
counts the engine requests in flight (waiting for a slot or running) and refuses a request that
would push them past ``max_in_flight`` (the state slots plus ``--max-queued-requests``) with a 429
and ``Retry-After``; a request whose fan-out alone is past ``--max-fanout`` (or past
``max_in_flight``, so it could never be admitted) gets a 400, as retrying it cannot help.

While draining (SIGTERM / SIGINT) every new request gets a 503 with ``Retry-After``; requests
already admitted run on, and ``interrupt_all`` ends whatever is still running, each choice with
``finish_reason: "abort"`` and a normal end of response (``[DONE]`` for streams).
"""

from __future__ import annotations

from typing import Protocol

from rnnserve.server.errors import bad_request, overloaded

RETRY_AFTER_OVERLOADED_S = 1  # a queue slot frees within a few engine steps
RETRY_AFTER_DRAINING_S = 5  # this server is going away: try again later (or another replica)


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


class Admission:
    """Counts engine requests in flight; tracks live generations so a drain can end them."""

    def __init__(self, *, max_in_flight: int | None, max_fanout: int) -> None:
        self.max_in_flight = max_in_flight  # None: no bound
        self.max_fanout = max_fanout
        self.in_flight = 0
        self.draining = False
        self._live: set[Interruptible] = set()

    def admit(self, fanout: int) -> None:
        """Reserve ``fanout`` engine requests, or raise the APIError that refuses them."""
        if self.draining:
            raise overloaded(
                "the server is shutting down and takes no new requests",
                RETRY_AFTER_DRAINING_S,
                status=503,
                code="server_shutting_down",
            )
        limit = self.max_fanout if self.max_in_flight is None else min(self.max_fanout, self.max_in_flight)
        if fanout > limit:
            raise bad_request(
                f"this request asks for {fanout} completions (prompts x n); this server takes at most {limit} "
                "in one request (--max-fanout)",
                param="n",
                code="fanout_exceeded",
            )
        if self.max_in_flight is not None and self.in_flight + fanout > self.max_in_flight:
            raise overloaded(
                f"the server is at capacity ({self.in_flight} sequences running or queued); retry shortly",
                RETRY_AFTER_OVERLOADED_S,
            )
        self.in_flight += fanout

    def release(self, fanout: int) -> None:
        self.in_flight -= fanout

    def track(self, generation: Interruptible) -> None:
        self._live.add(generation)

    def untrack(self, generation: Interruptible) -> None:
        self._live.discard(generation)

    @property
    def num_live(self) -> int:
        return len(self._live)

    def start_draining(self) -> None:
        self.draining = True

    def interrupt_all(self) -> None:
        """End every live generation now (finish_reason ``abort``); their engine requests are aborted."""
        for generation in list(self._live):
            generation.interrupt()


def unbounded() -> Admission:
    """No queue bound (an app built without one, e.g. in tests of other features)."""
    return Admission(max_in_flight=None, max_fanout=2**31)
