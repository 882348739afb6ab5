"""Running several engine streams at once (n choices x prompts) and SSE framing.

``MergedStreams`` pumps each engine iterator in its own task into one queue, so outputs of all
choices come out in arrival order. Stopping one choice (a stop string matched) or all of them (the
client went away, an error) cancels its pump; the cancellation runs the engine iterator's cleanup,
which aborts the request in the engine and frees its slot. Cleanup is shielded from the cancellation
that Starlette delivers when a client disconnects, so it always completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.types import Receive

from rnnserve.engine.request import RequestOutput

SSE_DONE = b"data: [DONE]\n\n"

# Line breaks that JSON leaves unescaped but ``str.splitlines`` (httpx ``aiter_lines``, many SSE
# clients) splits on; escaped, the chunk's JSON means the same and stays on one line.
_SPLITLINES_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})

T = TypeVar("T")


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    """One ``data: {...}`` event, on one line whatever line splitting the client uses."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return sse_data(data)


def sse_data(data: str) -> bytes:
    """``data: <json>`` framing for JSON text (control characters are already escaped by JSON)."""
    return f"data: {data.translate(_SPLITLINES_ESCAPES)}\n\n".encode()


class InputRejected(Exception):
    """The engine refused a request before running it (a ValueError from its first ``__anext__``)."""

    def __init__(self, cause: ValueError) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.param: str | None = getattr(cause, "param", None)


_INTERRUPT = -1  # the index of the item that ends the iteration early


@dataclass
class _Item:
    index: int  # a stream's index, or _INTERRUPT
    output: RequestOutput | None = None  # None with error None: the stream ended
    error: BaseException | None = None


class MergedStreams:
    """Iterate ``(index, RequestOutput)`` over several engine streams, in arrival order."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]) -> None:
        self._streams = streams
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._open: set[int] = set(range(len(streams)))
        self._closed = False

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        started = False
        try:
            async for output in stream:
                started = True
                await self._queue.put(_Item(index, output))
            await self._queue.put(_Item(index))
        except asyncio.CancelledError:
            raise
        except ValueError as exc:
            await self._queue.put(_Item(index, error=exc if started else InputRejected(exc)))
        except Exception as exc:
            await self._queue.put(_Item(index, error=exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]
        while self._open:
            item = await self._queue.get()
            if item.index == _INTERRUPT:
                return
            if item.index not in self._open:
                continue  # a stopped choice's last words
            if item.error is not None:
                raise item.error
            if item.output is None:
                self._open.discard(item.index)
                continue
            yield item.index, item.output

    def interrupt(self) -> None:
        """End the iteration at the next item (the streams keep running until ``aclose``)."""
        self._queue.put_nowait(_Item(_INTERRUPT))

    async def stop(self, index: int) -> None:
        """Stop one stream early (its request is aborted in the engine)."""
        self._open.discard(index)
        if index < len(self._tasks):
            await self._cancel([self._tasks[index]])
        else:
            aclose = getattr(self._streams[index], "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def aclose(self) -> None:
        """Stop every stream still running; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._open.clear()
        if self._tasks:
            await self._cancel(self._tasks)
            return
        with anyio.CancelScope(shield=True):
            for stream in self._streams:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` (a handler's generation) but cancel it if the client goes away first.

    Returns None when the client disconnected: its engine requests were aborted by the cancellation
    and there is nobody left to answer. Used until a response starts; StreamingResponse watches for
    the disconnect itself afterwards.
    """
    task: asyncio.Task[T] = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(watcher, return_exceptions=True)
            if task.cancelled() or not task.done():
                await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()
