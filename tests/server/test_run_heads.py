"""rnnserve.server.run.HeadTurns: request heads passed on per event-loop turn, addresses in turn.

The protocol is driven directly on a loop of the test's own, with transports that record what the
server writes: bytes handed to ``data_received`` in one synchronous block arrive in one loop turn,
as a burst's heads do in one poll, and each later turn is one pass of the loop.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from rnnserve.server.edge import EdgeGuard
from rnnserve.server.run import HeadTurns, ReadTimeoutProtocol, make_protocol


def get(path: str) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"


class Transport(asyncio.Transport):
    """A connection from ``address``: records writes, reading pauses and closing."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str, port: int) -> None:
        super().__init__()
        self.loop = loop
        self.address = address
        self.port = port
        self.written = b""
        self.paused = False
        self.closing = False
        self.protocol: ReadTimeoutProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.address, self.port), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            protocol, self.protocol = self.protocol, None
            if protocol is not None:
                self.loop.call_soon(protocol.connection_lost, None)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Server:
    """One server's protocol (``heads_per_turn`` heads per turn) serving an app that records the
    requests it is called for, (client address, path) in order, and echoes the request body."""

    def __init__(self, loop: asyncio.AbstractEventLoop, heads_per_turn: int, edge: bool = False) -> None:
        self.loop = loop
        self.calls: list[tuple[str, str]] = []
        self.guard = EdgeGuard(self.app, max_requests=1000, max_per_address=1000) if edge else None
        config = uvicorn.Config(
            self.guard or self.app, interface="asgi3", proxy_headers=False, log_level="warning", access_log=False
        )
        config.load()
        self.protocol = make_protocol(30.0, self.guard, heads_per_turn)
        self.config = config
        self.state = ServerState()
        self.ports = 40000

    @property
    def heads(self) -> HeadTurns:
        assert self.protocol.heads is not None
        return self.protocol.heads

    async def app(self, scope: dict, receive, send) -> None:
        assert scope["type"] == "http"
        self.calls.append((scope["client"][0], scope["path"]))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    def connect(self, address: str) -> tuple[ReadTimeoutProtocol, Transport]:
        self.ports += 1
        protocol = self.protocol(config=self.config, server_state=self.state, app_state={}, _loop=self.loop)
        transport = Transport(self.loop, address, self.ports)
        transport.protocol = protocol
        protocol.connection_made(transport)
        return protocol, transport

    def turns(self, n: int = 1) -> None:
        """Run the loop until every pass has run ``n`` more times."""
        for _ in range(n):
            self.loop.run_until_complete(asyncio.sleep(0))

    def settle(self) -> None:
        """Run the loop until no head waits and every request task has ended."""
        for _ in range(1000):
            self.turns()
            if not self.heads.waiting and not self.state.tasks:
                return
        raise AssertionError("the server did not settle")


@contextmanager
def server(heads_per_turn: int, edge: bool = False) -> Iterator[Server]:
    loop = asyncio.new_event_loop()
    try:
        yield Server(loop, heads_per_turn, edge)
    finally:
        loop.close()


def test_heads_past_the_bound_wait_and_then_get_their_responses() -> None:
    with server(heads_per_turn=2) as s:
        conns = [s.connect("10.0.0.1") for _ in range(5)]
        for i, (protocol, _) in enumerate(conns):  # one turn: five heads arrive
            protocol.data_received(get(f"/r{i}"))
        assert s.heads.waiting == 3 and s.heads.deferred == 3
        assert [t.paused for _, t in conns] == [False, False, True, True, True]  # kept: no reading meanwhile
        s.settle()
        assert s.calls == [("10.0.0.1", f"/r{i}") for i in range(5)]
        for _, transport in conns:
            assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.paused


def test_a_kept_connections_later_bytes_stay_in_order() -> None:
    with server(heads_per_turn=1) as s:
        first, _ = s.connect("10.0.0.1")
        first.data_received(get("/first"))  # takes the turn's one head
        protocol, transport = s.connect("10.0.0.1")
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
        protocol.data_received(head[:10])
        protocol.data_received(head[10:] + b"abc")  # kept too, after the first piece
        protocol.data_received(b"def")
        protocol.data_received(b"ghi")
        s.settle()
        assert transport.written.startswith(b"HTTP/1.1 200 ")
        assert transport.written.endswith(b"\r\n\r\nabcdefghi")


def test_addresses_take_turns() -> None:
    with server(heads_per_turn=2) as s:
        burst = [s.connect("10.0.0.2") for _ in range(6)]
        for i, (protocol, _) in enumerate(burst):
            protocol.data_received(get(f"/b{i}"))
        well_behaved, _ = s.connect("10.0.0.1")
        well_behaved.data_received(get("/w"))  # arrives after six of another address's heads
        s.settle()
        # Turn 1: /b0, /b1; turn 2: the two addresses' oldest waiting heads; then the rest.
        assert [path for _, path in s.calls] == ["/b0", "/b1", "/b2", "/w", "/b3", "/b4", "/b5"]


def test_a_connection_closed_while_kept_is_forgotten_with_its_bytes() -> None:
    with server(heads_per_turn=1) as s:
        first, _ = s.connect("10.0.0.1")
        first.data_received(get("/first"))
        protocol, transport = s.connect("10.0.0.1")
        protocol.data_received(get("/gone"))
        other, other_transport = s.connect("10.0.0.2")
        other.data_received(get("/other"))
        assert s.heads.waiting == 2
        transport.closing = True
        protocol.connection_lost(ConnectionResetError())  # the client goes before its turn
        assert s.heads.waiting == 1
        s.settle()
        assert s.calls == [("10.0.0.1", "/first"), ("10.0.0.2", "/other")]
        assert transport.written == b"" and other_transport.written.startswith(b"HTTP/1.1 200 ")
        ref = weakref.ref(protocol)
        del protocol, transport
        gc.collect()
        assert ref() is None  # nothing holds the closed connection


def test_a_connection_closed_before_its_turn_is_skipped() -> None:
    with server(heads_per_turn=1) as s:
        first, _ = s.connect("10.0.0.1")
        first.data_received(get("/first"))
        protocol, transport = s.connect("10.0.0.1")
        protocol.data_received(get("/gone"))
        transport.close()  # the read timeout (or the server's shutdown) closes it: lost a moment later
        s.settle()
        assert s.calls == [("10.0.0.1", "/first")] and transport.written == b""


def test_the_raw_head_refusal_waits_its_turn_too() -> None:
    with server(heads_per_turn=1, edge=True) as s:
        assert s.guard is not None
        s.guard.max_per_address = 0  # every counted request from any address is refused
        conns = [s.connect("10.0.0.1") for _ in range(3)]
        for protocol, _ in conns:
            protocol.data_received(get("/v1/x"))
        assert s.heads.waiting == 2 and [t.written != b"" for _, t in conns] == [True, False, False]
        s.settle()
        assert all(t.written.startswith(b"HTTP/1.1 429 ") for _, t in conns) and s.guard.refused == 3
        assert s.calls == []


def test_a_request_bodys_bytes_are_not_held_back() -> None:
    with server(heads_per_turn=1) as s:
        protocol, transport = s.connect("10.0.0.1")
        protocol.data_received(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        others = [s.connect("10.0.0.2") for _ in range(3)]
        for other, _ in others:
            other.data_received(get("/b"))  # past the turn's bound: kept
        protocol.data_received(b"def")  # the body of a request under way: passed at once
        assert s.heads.waiting == 3 and not transport.paused
        s.settle()
        assert transport.written.endswith(b"\r\n\r\nabcdef")
