"""The outermost ASGI layer: a bound on HTTP requests in flight, checked before anything else runs.

A burst of 2,000 requests at once puts 2,000 request tasks on the event loop in one go. Each that
reaches the app costs the middleware chain's objects (scope copies, header dicts, closures, the
replayed body) and its event-loop time, all while every other client's request waits behind it
in the same ready queue. The admission gate refuses them on the parsed body; this guard refuses
the excess earlier, on the request head alone, with the same 429 (``Retry-After``, the OpenAI error
shape), so a refused request allocates nothing beyond what uvicorn already made for it, and
closes its connection (``Connection: close``) instead of keeping it until the client closes.

Bounds, derived from admission's (``max_in_flight`` = state slots + ``--max-queued-requests``):

- per peer address: ``max_in_flight + slots`` HTTP requests. Admitted requests from one address
  never exceed ``max_in_flight`` (each holds at least one sequence), so this bound only refuses what
  admission would refuse too, while the requests of other ``user`` values behind the same address
  (a proxy) still reach the per-client share;
- in all: twice that, so one address's flood leaves as much room again to every other address.

Open paths (``/health``, ``/metrics``, ...) are neither counted nor refused.

Under a flood most refusals happen before this layer runs: the HTTP protocol (``run.py``) asks
``refuses`` when a request head arrives on a connection whose peer is already at a bound, and
answers the same 429 from its raw bytes (``REFUSAL_STATUS``, ``REFUSAL_HEADERS``, ``REFUSAL_BODY``)
without parsing the head into a request, so a refused request costs the event loop a byte search
instead of a parse, a task and the response's serialisation. This layer still decides every request
the protocol lets through.

When the server goes idle after serving a burst, ``malloc_trim`` hands the C heap's free pages back
to the system (glibc only): a burst's request buffers leave most of the heap's growth free but
fragmented, which ``free`` alone does not return.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import cache

from starlette.types import ASGIApp, Receive, Scope, Send

from rnnserve.server.admission import RETRY_AFTER_OVERLOADED_S
from rnnserve.server.errors import error_body_json

logger = logging.getLogger("rnnserve.server")

# Requests served since the last trim that make the next idle moment worth a trim: fewer leave too
# little free heap behind to matter.
TRIM_AFTER_REQUESTS = 256
# Idle this long before trimming, so a trim never runs between the requests of one burst.
TRIM_DELAY_S = 1.0

REFUSAL_STATUS = 429
REFUSAL_BODY = error_body_json(
    REFUSAL_STATUS, "the server has too many requests in flight; retry shortly", code="overloaded"
)
REFUSAL_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(REFUSAL_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_OVERLOADED_S).encode()),
    (b"connection", b"close"),  # as the admission gate's 429: a flood's connections go at once
]
_START = {"type": "http.response.start", "status": REFUSAL_STATUS, "headers": REFUSAL_HEADERS}
_END = {"type": "http.response.body", "body": REFUSAL_BODY, "more_body": False}


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class EdgeGuard:
    """429 for an HTTP request past ``max_requests`` in flight, or past ``max_per_address`` from its
    peer address, before the app sees it; ``None`` bounds nothing."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_requests: int | None,
        max_per_address: int | None,
        open_paths: tuple[str, ...] = (),
        trim_after: int = TRIM_AFTER_REQUESTS,
    ) -> None:
        self.app = app
        self.max_requests = max_requests
        self.max_per_address = max_per_address
        self.open_paths = frozenset(open_paths)
        self.in_flight = 0
        self.refused = 0  # requests this guard answered with 429 (tests, debugging)
        self._per_address: dict[str, int] = {}  # address -> its requests in flight (only > 0)
        self._trim_after = trim_after
        self._since_trim = 0
        self._trim_timer: asyncio.TimerHandle | None = None

    def in_flight_of(self, address: str) -> int:
        return self._per_address.get(address, 0)

    def refuses(self, address: str) -> bool:
        """Whether a request from ``address`` to a counted path would get the 429 now."""
        return (self.max_requests is not None and self.in_flight >= self.max_requests) or (
            self.max_per_address is not None and self._per_address.get(address, 0) >= self.max_per_address
        )

    def count_refusal(self) -> None:
        """Account for a request refused with the 429, here or by the protocol ahead of this layer."""
        self.refused += 1
        self._since_trim += 1
        self._maybe_schedule_trim()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        if self.refuses(address):
            await send(_START)
            await send(_END)
            self.count_refusal()
            return
        self._since_trim += 1
        self.in_flight += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            held = self._per_address.pop(address) - 1
            if held:
                self._per_address[address] = held
            self._maybe_schedule_trim()

    def _maybe_schedule_trim(self) -> None:
        if self.in_flight or self._since_trim < self._trim_after:
            return
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim_timer = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim)

    def _trim(self) -> None:
        self._trim_timer = None
        if self.in_flight:  # busy again: the next idle moment trims
            return
        self._since_trim = 0
        if release_free_heap():
            logger.debug("idle after a burst: returned the C heap's free pages to the system")


def edge_bounds(max_in_flight: int | None, slots: int | None) -> tuple[int | None, int | None]:
    """(in all, per address) HTTP requests in flight for admission's ``max_in_flight`` sequences and
    the pool's ``slots``; (None, None) when admission has no bound."""
    if max_in_flight is None or slots is None:
        return None, None
    per_address = max_in_flight + slots
    return 2 * per_address, per_address
