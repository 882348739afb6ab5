"""The slice of ``rnnserve.engine.engine.AsyncEngine`` the server uses, as a protocol.

The server depends on this protocol rather than the class so that tests can drive the HTTP layer
with a scripted engine (e.g. one that fails) and the real engine alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from rnnserve.engine.request import RequestOutput, SamplingParams


class EngineClient(Protocol):
    max_model_len: int | None
    vocab_size: int

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs (deltas) of one request. Input errors (ValueError subclasses: EngineInputError,
        SamplingParamsError) are raised from the first ``__anext__``; closing the iterator early
        aborts the request and frees its slot. An engine with ``takes_state_options = True`` also
        takes the keywords ``fork_of`` (n > 1: share that sibling's prefill), ``initial_state`` and
        ``save_state`` (``LLMEngine.add_request``)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> Any:
        """An ``EngineStats``: num_running, num_waiting, num_slots, slots_used, state_bytes_per_slot,
        state_pool_usage, prompt_tokens_total, generation_tokens_total, num_steps, last_step_seconds."""
        ...
