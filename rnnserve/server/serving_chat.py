"""/v1/chat/completions: chat template -> prompt ids, n choices, chat logprobs, SSE.

Stream framing (as OpenAI): the first chunk of a choice carries ``role`` with its first text,
then content deltas, then a chunk with an empty delta and ``finish_reason``; after all choices, a
``choices: []`` chunk with usage when ``stream_options.include_usage``; then ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from rnnserve.engine.request import TokenLogprob
from rnnserve.server.context import ServingContext
from rnnserve.server.errors import bad_request
from rnnserve.server.generation import (
    ChoiceDelta,
    EngineFailure,
    Generation,
    Prompt,
    build_sampling_params,
    check_prompt,
    default_chat_max_tokens,
    engine_error,
    stream_response,
)
from rnnserve.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    now,
    random_id,
)
from rnnserve.server.streaming import sse_data
from rnnserve.server.tokenizer import ChatTemplateError


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template sees them: content parts joined into one string."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part type {part.type!r} is not supported (text only)", param=f"messages.{i}.content"
                    )
                texts.append(part.text)
            d["content"] = "".join(texts)
        elif content is None:
            d["content"] = ""
        out.append(d)
    return out


def render_chat_prompt(ctx: ServingContext, body: ChatCompletionRequest | Any) -> Prompt:
    tokenizer = ctx.require_tokenizer("chat messages", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            message_dicts(body.messages),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=getattr(body, "continue_final_message", False),
            extra=getattr(body, "chat_template_kwargs", None),
        )
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages", code="chat_template_error") from exc
    return Prompt(tokenizer.encode(text, add_special_tokens=False), text)


def _chat_logprobs(ctx: ServingContext, entries: list[TokenLogprob], top_n: int, as_ids: bool) -> ChatLogprobs:
    content = []
    for lp in entries:
        top = sorted(lp.top.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(
            ChatTokenLogprob(
                token=ctx.token_str(lp.token_id, as_ids),
                logprob=lp.logprob,
                bytes=ctx.token_bytes(lp.token_id),
                top_logprobs=[
                    TopLogprob(token=ctx.token_str(t, as_ids), logprob=v, bytes=ctx.token_bytes(t)) for t, v in top
                ],
            )
        )
    return ChatLogprobs(content=content)


async def create_chat_completion(
    ctx: ServingContext, body: ChatCompletionRequest, client: str = ""
) -> JSONResponse | StreamingResponse:
    ctx.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    prompt = render_chat_prompt(ctx, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    check_prompt(
        prompt.token_ids,
        vocab_size=ctx.vocab_size,
        max_model_len=ctx.max_model_len,
        max_tokens=max_tokens,
        param="messages",
    )
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    params = build_sampling_params(
        body,
        max_tokens=max_tokens,
        default_max_tokens=default_chat_max_tokens(len(prompt.token_ids), ctx.max_model_len),
        logprobs=top_n if body.logprobs else None,
        prompt_logprobs=None,
        defaults=ctx.sampling_defaults,
        vocab_size=ctx.vocab_size,
    )
    request_id = random_id("chatcmpl")
    gen = Generation(
        ctx.engine,
        ctx.tokenizer,
        ctx.metrics,
        request_id,
        [prompt],
        body,
        params,
        n=body.n,
        admission=ctx.admission,
        client=client,
        timeout=ctx.request_timeout,
        want_logprobs=body.logprobs,
    )
    if body.stream:
        return await _stream(ctx, body, gen, request_id, top_n)
    return await _complete(ctx, body, gen, request_id, top_n)


async def _complete(
    ctx: ServingContext, body: ChatCompletionRequest, gen: Generation, request_id: str, top_n: int
) -> JSONResponse:
    entries: list[list[TokenLogprob]] = [[] for _ in gen.choices]
    try:
        async for delta in gen.deltas():
            entries[delta.index].extend(delta.logprobs)
    except EngineFailure as exc:
        raise engine_error(exc) from exc
    choices = [
        ChatChoice(
            index=c.index,
            message=ChatResponseMessage(content=c.text),
            logprobs=_chat_logprobs(ctx, entries[c.index], top_n, body.return_tokens_as_token_ids)
            if c.want_logprobs
            else None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            token_ids=c.token_ids if body.return_token_ids else None,
        )
        for c in gen.choices
    ]
    usage = gen.usage()
    response = ChatCompletionResponse(
        id=request_id,
        created=now(),
        model=ctx.model_name,
        choices=choices,
        usage=usage,
        prompt_token_ids=gen.prompts[0].token_ids if body.return_token_ids else None,
    )
    return JSONResponse(response.model_dump())


async def _stream(
    ctx: ServingContext, body: ChatCompletionRequest, gen: Generation, request_id: str, top_n: int
) -> StreamingResponse:
    created = now()
    role_sent = [False] * len(gen.choices)

    def make_chunk(choice: ChatStreamChoice) -> bytes:
        chunk = ChatCompletionChunk(
            id=request_id, object="chat.completion.chunk", created=created, model=ctx.model_name, choices=[choice]
        )
        return sse_data(chunk.model_dump_json(exclude_unset=True))

    def chunks(delta: ChoiceDelta) -> list[bytes]:
        out = []
        choice = gen.choices[delta.index]
        logprobs = (
            _chat_logprobs(ctx, delta.logprobs, top_n, body.return_tokens_as_token_ids)
            if choice.want_logprobs and delta.logprobs
            else None
        )
        if delta.text or logprobs is not None or not role_sent[delta.index]:
            message = DeltaMessage(content=delta.text)
            if not role_sent[delta.index]:
                role_sent[delta.index] = True
                message = DeltaMessage(role="assistant", content=delta.text)
            content_choice = ChatStreamChoice(index=delta.index, delta=message, logprobs=logprobs, finish_reason=None)
            if body.return_token_ids:
                content_choice.token_ids = delta.token_ids
            out.append(make_chunk(content_choice))
        if delta.finish_reason is not None:
            out.append(
                make_chunk(
                    ChatStreamChoice(
                        index=delta.index,
                        delta=DeltaMessage(),
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                )
            )
        return out

    def usage_chunk(usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=[], usage=usage)

    return await stream_response(gen, chunks, usage_chunk if body.include_usage else None)
