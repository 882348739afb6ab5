"""Admission control and drain: how much work the server takes, and how it lets go of it.

Every HTTP generation request becomes ``fan-out = prompts x n`` engine requests. ``Admission``
counts the engine requests in flight (waiting for a slot or running) and refuses a request that
would push them past ``max_in_flight`` (the state slots plus ``--max-queued-requests``) with a 429
and ``Retry-After``; a request whose fan-out alone is past ``--max-fanout`` (or past
``max_in_flight``, so it could never be admitted) gets a 400, as retrying it cannot help.

Fair share: each client (its key: the OpenAI ``user`` field when given, else its address) may hold
at most ``max_per_client`` engine requests in flight (``--max-in-flight-per-client``; by default
every slot and half the queue), so a burst from one client leaves room for the others; past it that client
gets a 429 with ``Retry-After``. A client with nothing in flight is always let in up to the fan-out
limit, so one large request is never refused for being larger than the share. The engine's scheduler
then admits waiting requests round-robin across the same keys (``SamplingParams.client``).

While draining (SIGTERM / SIGINT) every new request gets a 503 with ``Retry-After``; requests
already admitted run on, and ``interrupt_all`` ends whatever is still running, each choice with
``finish_reason: "abort"`` and a normal end of response (``[DONE]`` for streams).
"""

from __future__ import annotations

from typing import Protocol

from rnnserve.server.errors import APIError, bad_request, overloaded

RETRY_AFTER_OVERLOADED_S = 1  # a queue slot frees within a few engine steps
RETRY_AFTER_DRAINING_S = 5  # this server is going away: try again later (or another replica)


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


class Admission:
    """Counts engine requests in flight; tracks live generations so a drain can end them."""

    def __init__(self, *, max_in_flight: int | None, max_fanout: int, max_per_client: int | None = None) -> None:
        self.max_in_flight = max_in_flight  # None: no bound
        self.max_fanout = max_fanout
        self.max_per_client = max_per_client  # None: no per-client share
        self.in_flight = 0
        self._per_client: dict[str, int] = {}  # client key -> its engine requests in flight (only > 0)
        self.draining = False
        self._live: set[Interruptible] = set()

    def admit(self, fanout: int, client: str = "") -> None:
        """Reserve ``fanout`` engine requests for ``client``, or raise the APIError that refuses them."""
        refusal = self.refusal(fanout, client)
        if refusal is not None:
            raise refusal
        self.in_flight += fanout
        self._per_client[client] = self._per_client.get(client, 0) + fanout

    def could_refuse(self) -> bool:
        """Whether any request of an admissible fan-out could be refused now (429 / 503). False while
        the server has room even for the largest fan-out from its busiest client, so the admission
        gate need not parse the body of requests it would let through anyway."""
        if self.draining:
            return True
        limit = self.max_fanout if self.max_in_flight is None else min(self.max_fanout, self.max_in_flight)
        bounds = [b for b in (self.max_in_flight, self.max_per_client) if b is not None]
        # A client holds at most everything in flight, so in_flight bounds every per-client count.
        return any(self.in_flight + limit > b for b in bounds)

    def refusal(self, fanout: int, client: str = "") -> APIError | None:
        """The APIError that would refuse ``fanout`` more engine requests for ``client`` now, or None."""
        if self.draining:
            return overloaded(
                "the server is shutting down and takes no new requests",
                RETRY_AFTER_DRAINING_S,
                status=503,
                code="server_shutting_down",
            )
        limit = self.max_fanout if self.max_in_flight is None else min(self.max_fanout, self.max_in_flight)
        if fanout > limit:
            return bad_request(
                f"this request asks for {fanout} completions (prompts x n); this server takes at most {limit} "
                "in one request (--max-fanout)",
                param="n",
                code="fanout_exceeded",
            )
        if self.max_in_flight is not None and self.in_flight + fanout > self.max_in_flight:
            return overloaded(
                f"the server is at capacity ({self.in_flight} sequences running or queued); retry shortly",
                RETRY_AFTER_OVERLOADED_S,
            )
        held = self._per_client.get(client, 0)
        if self.max_per_client is not None and held > 0 and held + fanout > self.max_per_client:
            return overloaded(
                f"this client has {held} sequences running or queued, its share of this server "
                f"(--max-in-flight-per-client {self.max_per_client}); retry shortly",
                RETRY_AFTER_OVERLOADED_S,
            )
        return None

    def release(self, fanout: int, client: str = "") -> None:
        self.in_flight -= fanout
        held = self._per_client.pop(client, 0) - fanout
        if held > 0:
            self._per_client[client] = held

    def in_flight_of(self, client: str) -> int:
        return self._per_client.get(client, 0)

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


def per_client_share(flag: int | None, slots: int | None, queued: int | None) -> int | None:
    """``--max-in-flight-per-client``; 0 is no share. None (the default): every slot and half the
    queue (rounded down), so one client alone (a load generator, or every request arriving through
    one proxy address) can still fill every slot, and the other half of the queue stays open to
    the other clients."""
    if flag == 0:
        return None
    if flag is None:
        return None if slots is None or queued is None else slots + queued // 2
    return flag


def client_key(user: str | None, address: str | None) -> str:
    """The fair-share key: the OpenAI ``user`` field when given, else the peer address (no proxy
    header is trusted). Prefixed so a ``user`` value cannot take an address's share."""
    if user:
        return f"user:{user}"
    return f"addr:{address or ''}"


def unbounded() -> Admission:
    """No queue bound (an app built without one, e.g. in tests of other features)."""
    return Admission(max_in_flight=None, max_fanout=2**31)


def raw_fanout(body: object, chat: bool) -> int | None:
    """prompts x ``n`` of a generation request's parsed JSON body, counted as its handler counts
    them; None when the body is not a well-formed request (the handler then answers 400)."""
    if not isinstance(body, dict):
        return None
    n = body.get("n", 1)
    n = 1 if n is None else n
    if type(n) is not int or n < 1:
        return None
    if chat:
        return n
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        return n
    if isinstance(prompt, list) and prompt:
        return len(prompt) * n
    return None
