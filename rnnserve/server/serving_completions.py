"""/v1/completions: text or token-id prompts, n choices each, echo, legacy logprobs, SSE."""

from __future__ import annotations

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
    engine_error,
    stream_response,
)
from rnnserve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    now,
    random_id,
)
from rnnserve.server.streaming import sse

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_prompts(ctx: ServingContext, body: CompletionRequest) -> list[Prompt]:
    """The four prompt forms -> token ids (and text, for echo)."""
    p = body.prompt
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif not p:
        raise bad_request("the prompt is empty", param="prompt")
    elif all(isinstance(x, int) for x in p):
        items = [list(p)]  # type: ignore[arg-type]
    else:
        items = list(p)  # type: ignore[arg-type]
    prompts: list[Prompt] = []
    for item in items:
        if isinstance(item, str):
            tok = ctx.require_tokenizer("text prompts", param="prompt")
            prompts.append(Prompt(tok.encode(item), item))
        else:
            ids = list(item)
            # Before decoding for echo: the tokenizer overflows on a negative or huge id (a 500).
            bad = next((t for t in ids if not 0 <= t < ctx.vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is out of the vocabulary (0..{ctx.vocab_size - 1})", param="prompt")
            text = ctx.tokenizer.decode(ids) if (ctx.tokenizer is not None and body.echo) else None
            prompts.append(Prompt(ids, text))
    return prompts


class _LegacyLogprobs:
    """Accumulates OpenAI's legacy logprobs lists for one choice, with text offsets."""

    def __init__(self, ctx: ServingContext, as_ids: bool = False) -> None:
        self._ctx = ctx
        self._as_ids = as_ids
        self.offset = 0

    def build(self, entries: list[tuple[int, TokenLogprob | None]]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, lp in entries:
            token = self._ctx.token_str(token_id, self._as_ids)
            out.tokens.append(token)
            out.text_offset.append(self.offset)
            self.offset += len(token)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(lp.logprob)
            top = {self._ctx.token_str(t, self._as_ids): v for t, v in sorted(lp.top.items(), key=lambda kv: -kv[1])}
            top.setdefault(token, lp.logprob)
            out.top_logprobs.append(top)
        return out


def _prompt_entries(prompt: Prompt, prompt_logprobs: list[TokenLogprob | None] | None) -> list:
    lps = prompt_logprobs or []
    return [(t, lps[i] if i < len(lps) else None) for i, t in enumerate(prompt.token_ids)]


async def create_completion(
    ctx: ServingContext, body: CompletionRequest, client: str = ""
) -> JSONResponse | StreamingResponse:
    ctx.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    # echo + max_tokens=0 scores the prompt without generating (how lm-eval-harness asks for
    # loglikelihoods): the engine generates one token, which the response leaves out.
    score_only = body.max_tokens == 0
    if score_only and (not body.echo or body.stream):
        raise bad_request("max_tokens=0 is only for scoring a prompt: it needs echo=true and no stream", "max_tokens")
    prompts = parse_prompts(ctx, body)
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    max_tokens = 1 if score_only else max_tokens
    for i, prompt in enumerate(prompts):
        # Only an explicit max_tokens can overrun max_model_len; the default stops at the limit.
        check_prompt(
            prompt.token_ids,
            vocab_size=ctx.vocab_size,
            max_model_len=ctx.max_model_len,
            max_tokens=None if body.max_tokens is None else max_tokens,
            param="prompt" if len(prompts) == 1 else f"prompt.{i}",
        )
    if body.stop_strings():
        ctx.require_tokenizer("stop strings", param="stop")
    want_logprobs = body.logprobs is not None
    params = build_sampling_params(
        body,
        max_tokens=max_tokens,
        default_max_tokens=None,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if (body.echo and want_logprobs) else None,
        defaults=ctx.sampling_defaults,
        vocab_size=ctx.vocab_size,
    )
    request_id = random_id("cmpl")
    gen = Generation(
        ctx.engine,
        ctx.tokenizer,
        ctx.metrics,
        request_id,
        prompts,
        body,
        params,
        n=body.n,
        admission=ctx.admission,
        client=client,
        timeout=ctx.request_timeout,
        want_logprobs=want_logprobs,
    )
    if body.stream:
        return await _stream(ctx, body, gen, request_id)
    return await _complete(ctx, body, gen, request_id, score_only)


async def _complete(
    ctx: ServingContext, body: CompletionRequest, gen: Generation, request_id: str, score_only: bool
) -> JSONResponse:
    entries: list[list[tuple[int, TokenLogprob | None]]] = [[] for _ in gen.choices]
    try:
        async for delta in gen.deltas():
            entries[delta.index].extend((lp.token_id, lp) for lp in delta.logprobs)
    except EngineFailure as exc:
        raise engine_error(exc) from exc
    choices = []
    for choice in gen.choices:
        if score_only:
            choice.token_ids, choice.num_output_tokens = [], 0
        text = "" if score_only else choice.text
        token_entries = [] if score_only else entries[choice.index]
        if body.echo:
            text = (choice.prompt.text or "") + text
            token_entries = _prompt_entries(choice.prompt, choice.prompt_logprobs) + token_entries
        as_ids = body.return_tokens_as_token_ids
        logprobs = _LegacyLogprobs(ctx, as_ids).build(token_entries) if choice.want_logprobs else None
        choices.append(
            CompletionChoice(
                index=choice.index,
                text=text,
                logprobs=logprobs,
                finish_reason="length" if score_only else choice.finish_reason,
                stop_reason=None if score_only else choice.stop_reason,
                prompt_token_ids=choice.prompt.token_ids if body.return_token_ids else None,
                token_ids=choice.token_ids if body.return_token_ids else None,
            )
        )
    usage = gen.usage()
    response = CompletionResponse(id=request_id, created=now(), model=ctx.model_name, choices=choices, usage=usage)
    return JSONResponse(response.model_dump())


async def _stream(ctx: ServingContext, body: CompletionRequest, gen: Generation, request_id: str) -> StreamingResponse:
    created = now()
    logprob_state = [_LegacyLogprobs(ctx, body.return_tokens_as_token_ids) for _ in gen.choices]
    started = [False] * len(gen.choices)

    def chunk(delta: ChoiceDelta) -> bytes:
        choice = gen.choices[delta.index]
        text = delta.text
        token_entries: list[tuple[int, TokenLogprob | None]] = [(lp.token_id, lp) for lp in delta.logprobs]
        first_chunk = not started[delta.index]
        if first_chunk:
            started[delta.index] = True
            if body.echo:
                text = (choice.prompt.text or "") + text
                token_entries = _prompt_entries(choice.prompt, choice.prompt_logprobs) + token_entries
        logprobs = logprob_state[delta.index].build(token_entries) if choice.want_logprobs else None
        return sse(
            CompletionResponse(
                id=request_id,
                created=created,
                model=ctx.model_name,
                choices=[
                    CompletionChoice(
                        index=delta.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        prompt_token_ids=choice.prompt.token_ids if (body.return_token_ids and first_chunk) else None,
                        token_ids=delta.token_ids if body.return_token_ids else None,
                    )
                ],
            )
        )

    def usage_chunk(usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[], usage=usage)

    return await stream_response(gen, lambda delta: [chunk(delta)], usage_chunk if body.include_usage else None)
