"""Serving an app with uvicorn: connection timeouts for slow clients and a graceful drain on SIGTERM.

Timeouts. uvicorn closes a keep-alive connection idle for ``--keep-alive-timeout`` seconds, but
nothing bounds a connection that never completes its request headers (opened and left idle, or
sending a byte now and then). ``ReadTimeoutProtocol`` closes a connection whose request headers are
not complete ``--read-timeout`` seconds after it opened or after its previous response ended. A
body that trickles in is bounded by ``BodyLimitMiddleware`` (408 after the same timeout).

Drain. On the first SIGTERM or SIGINT, the server stops admitting (new requests on open
connections get 503 with ``Retry-After``, ``/health`` answers 503, the listening socket closes),
requests already running go on for up to ``--shutdown-timeout`` seconds, then every one still
running ends with ``finish_reason: "abort"`` and a normal end of response (``data: [DONE]`` for a
stream), and the process exits with status 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from rnnserve.config import ServerConfig
from rnnserve.server.admission import Admission

logger = logging.getLogger("rnnserve.server")

# After the drain interrupts what still runs, the aborted responses need a moment to go out before
# uvicorn cancels the connections' tasks.
_FLUSH_GRACE_S = 5.0


class ReadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive in time."""

    read_timeout: float = 30.0  # set per server by ``protocol_with_read_timeout``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: Any = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle  # headers complete: the request runs, the body has its own timeout
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.read_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        in_request = self.cycle is not None and self.cycle is self._seen_cycle and not self.cycle.response_complete
        if not in_request and not self.transport.is_closing():
            logger.debug("closing a connection whose request headers did not arrive in %.1f s", self.read_timeout)
            self.transport.close()


def protocol_with_read_timeout(read_timeout: float) -> type[ReadTimeoutProtocol]:
    return type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout": read_timeout})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app's admitted requests on the first SIGTERM / SIGINT."""

    def __init__(self, config: uvicorn.Config, admission: Admission, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # Drained: exit with status 0 instead of uvicorn re-raising the signal once it is done (which
        # kills the process with that signal, or raises KeyboardInterrupt for SIGINT).
        if not self.force_exit:
            getattr(self, "_captured_signals", []).clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain, signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    def begin_drain(self, why: str) -> None:
        """Stop admitting now; end what still runs after ``shutdown_timeout`` seconds."""
        if self.admission.draining:
            return
        logger.info(
            "%s: draining %d running request(s) for up to %.1f s", why, self.admission.num_live, self.shutdown_timeout
        )
        self.admission.start_draining()
        asyncio.get_running_loop().call_later(self.shutdown_timeout, self._interrupt)

    def _interrupt(self) -> None:
        if self.admission.num_live:
            logger.info("shutdown timeout: ending %d request(s) with finish_reason abort", self.admission.num_live)
        self.admission.interrupt_all()


def run(app: FastAPI, cfg: ServerConfig, sockets: list[socket.socket] | None = None) -> None:
    """Serve ``app`` (from ``build_app``) on ``sockets`` if given, else on ``cfg.host:cfg.port``, until
    SIGTERM / SIGINT, then drain."""
    config = uvicorn.Config(
        app.state.edge,  # the app behind EdgeGuard (build_app)
        host=cfg.host,
        port=cfg.port,
        workers=1,
        log_level=cfg.log_level,
        # No X-Forwarded-For: a client is its peer address (admission's fair share, the edge bound).
        proxy_headers=False,
        http=protocol_with_read_timeout(cfg.read_timeout),
        timeout_keep_alive=cfg.keep_alive_timeout,  # type: ignore[arg-type]  # any number of seconds works
        timeout_graceful_shutdown=cfg.shutdown_timeout + _FLUSH_GRACE_S,  # type: ignore[arg-type]
    )
    freeze_startup_heap()
    DrainingServer(config, app.state.admission, cfg.shutdown_timeout).run(sockets=sockets)


def freeze_startup_heap() -> None:
    """Collect, then move every object still alive (the model, torch, transformers, the tokenizer:
    ~380k tracked objects with the default model) into the collector's permanent generation, so a
    full collection scans only what serving allocated since. Without it each full collection walked
    them all: 0.5-0.7 s with the GIL held, three times in a 2,000-request burst, stalling the event
    loop and the engine thread alike (the p99 TTFT of other clients). The cost: a frozen object
    that later becomes part of a reference cycle of garbage is not collected; what is alive once
    the server is built (modules, the model, the app) lives as long as the process anyway."""
    gc.collect()
    gc.freeze()
