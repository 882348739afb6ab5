"""/v1/states: save the state after a prompt under a name, list the saved names.

A saved state is a starting point for later requests (``"initial_state": "name"`` in the body,
``extra_body`` in the openai client): RWKV "state tuning" files and long fixed prompts (a persona, a
document) alike. The engine runs the prompt once (one greedy token, which is discarded) and writes
the state after the prompt to ``--state-dir``; the API key, when set, guards this path as any other.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from rnnserve.engine.request import SamplingParams
from rnnserve.engine.state_store import StateNotFoundError, check_state_name
from rnnserve.server.context import ServingContext
from rnnserve.server.errors import APIError, bad_request
from rnnserve.server.generation import check_prompt
from rnnserve.server.protocol import OpenAIRequest, random_id
from rnnserve.server.streaming import InputRejected, MergedStreams

logger = logging.getLogger(__name__)


class SaveStateRequest(OpenAIRequest):
    name: str = Field(min_length=1, max_length=128)
    prompt: str | list[int]
    model: str | None = None


def _require_states(ctx: ServingContext) -> None:
    if not getattr(ctx.engine, "takes_state_options", False):
        raise bad_request("this server cannot save states", param="name")


async def save_state(ctx: ServingContext, body: SaveStateRequest) -> dict[str, Any]:
    ctx.check_model(body.model)
    _require_states(ctx)
    try:
        check_state_name(body.name)
    except StateNotFoundError as exc:
        raise bad_request(str(exc), param="name") from exc
    if isinstance(body.prompt, str):
        ids = ctx.require_tokenizer("text prompts", param="prompt").encode(body.prompt)
    else:
        ids = list(body.prompt)
    check_prompt(ids, vocab_size=ctx.vocab_size, max_model_len=ctx.max_model_len, max_tokens=1, param="prompt")
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    stream = ctx.engine.generate(random_id("state"), ids, params, save_state=body.name)  # type: ignore[call-arg]
    streams = MergedStreams([stream])
    try:
        async for _, out in streams:
            if out.error is not None:  # the cause goes to the log, not to the client
                logger.error("saving state %r failed: %s", body.name, out.error)
                raise APIError(500, "the state could not be saved (logged on the server)", code="state_not_saved")
            if out.finished:
                break
    except InputRejected as exc:
        raise bad_request(str(exc), param=exc.param or "name") from exc
    finally:
        await streams.aclose()
    return {"object": "state", "name": body.name, "num_tokens": len(ids)}


def list_states(ctx: ServingContext) -> dict[str, Any]:
    names: list[str] = ctx.engine.state_names() if getattr(ctx.engine, "takes_state_options", False) else []  # type: ignore[attr-defined]
    return {"object": "list", "data": [{"object": "state", "name": n} for n in names]}
