"""What both endpoints share: prompts -> engine requests, outputs -> text deltas per choice.

A request with P prompts and ``n`` choices becomes P*n engine requests (choice index
``prompt * n + i``, as OpenAI orders them). Each choice turns engine outputs into text with an
incremental detokenizer, applies stop strings (stopping the engine request when one matches),
keeps logprobs, and feeds the latency metrics.

A generation holds its P*n engine requests against the server's admission bound from construction
until ``deltas()`` ends. ``interrupt()`` (``--request-timeout``, or a drain running out of time) ends
every unfinished choice with ``finish_reason: "abort"``; the response itself still ends normally.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from rnnserve.engine.request import FinishReason, RequestOutput, SamplingParams, SamplingParamsError, TokenLogprob
from rnnserve.server.admission import Admission, unbounded
from rnnserve.server.detokenizer import IncrementalDetokenizer, StopMatcher
from rnnserve.server.engine_client import EngineClient
from rnnserve.server.errors import APIError, bad_request
from rnnserve.server.metrics import ServerMetrics
from rnnserve.server.protocol import PromptTokensDetails, SamplingRequest, UsageInfo
from rnnserve.server.sampling_defaults import SamplingDefaults
from rnnserve.server.streaming import SSE_DONE, InputRejected, MergedStreams, sse
from rnnserve.server.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A chat request without max_tokens gets at most this many tokens (never past the context): a
# small model may never emit EOS, and an answer should not run for minutes by default.
DEFAULT_CHAT_MAX_TOKENS = 256

# JSON has no -inf or NaN: a logprob that is not finite goes out as this (vLLM's stand-in for -inf).
LOGPROB_FLOOR = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def finite_logprob(lp: TokenLogprob) -> TokenLogprob:
    """The same entry with every value finite (JSON cannot carry the rest)."""
    if math.isfinite(lp.logprob) and all(math.isfinite(v) for v in lp.top.values()):
        return lp
    return TokenLogprob(lp.token_id, _finite(lp.logprob), {t: _finite(v) for t, v in lp.top.items()})


class EngineFailure(Exception):
    """The engine failed while running a request (HTTP 500)."""


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # the text as given (or decoded), for echo


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]  # the tokens whose text is (at least partly) in this delta
    logprobs: list[TokenLogprob]  # of those tokens, when asked for
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class ChoiceState:
    """One choice's progress: detokenizer, stop strings, logprobs and timings."""

    index: int
    prompt: Prompt
    detok: IncrementalDetokenizer | None
    stops: StopMatcher
    want_logprobs: bool
    start_time: float
    token_ids: list[int] = field(default_factory=list)
    pending_token_ids: list[int] = field(default_factory=list)  # held back with their text
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens the engine restored from its prefix cache
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def text(self) -> str:
        return self.stops.text[: self.stops.emitted]


def finish_reason_name(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


class Generation:
    """Runs all choices of one HTTP request and yields their deltas."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Tokenizer | None,
        metrics: ServerMetrics,
        request_id: str,
        prompts: list[Prompt],
        body: SamplingRequest,
        params: SamplingParams,
        *,
        n: int,
        want_logprobs: bool,
        admission: Admission | None = None,
        timeout: float | None = None,
        client: str = "",
    ) -> None:
        check_state_options(engine, body)
        # First, so a refused request (429, 503, fan-out) leaves nothing behind.
        self.admission = admission or unbounded()
        self.fanout = len(prompts) * n
        self.client = client  # the fair-share key (see admission.py); the engine schedules by it too
        self.admission.admit(self.fanout, client)
        params = dataclasses.replace(params, client=client)
        self.timeout = timeout
        self.interrupted = False
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.request_id = request_id
        self.start_time = time.monotonic()
        self.stop_token_ids = set(params.stop_token_ids)
        self.min_tokens = params.min_tokens
        self.prompts = prompts
        self.n = n
        self.choices: list[ChoiceState] = []
        streams: list[AsyncIterator[RequestOutput]] = []
        stops = body.stop_strings()
        for p_idx, prompt in enumerate(prompts):
            for i in range(n):
                index = p_idx * n + i
                # n > 1 with a seed: every choice reproducible, yet the choices differ.
                choice_params = params
                if params.seed is not None and i > 0:
                    choice_params = _replace_seed(params, params.seed + i)
                detok = (
                    IncrementalDetokenizer(tokenizer, prompt.token_ids, body.skip_special_tokens)
                    if tokenizer is not None
                    else None
                )
                self.choices.append(
                    ChoiceState(
                        index=index,
                        prompt=prompt,
                        detok=detok,
                        stops=StopMatcher(stops, body.include_stop_str_in_output),
                        want_logprobs=want_logprobs,
                        start_time=self.start_time,
                    )
                )
                # Choices after a prompt's first are forks of it: the engine prefills the prompt once.
                options = engine_options(engine, body, fork_of=f"{request_id}-{p_idx * n}" if i > 0 else None)
                streams.append(
                    engine.generate(f"{request_id}-{index}", list(prompt.token_ids), choice_params, **options)
                )
        self.streams = MergedStreams(streams)

    def interrupt(self) -> None:
        """End now: unfinished choices finish with "abort" and their engine requests are aborted."""
        self.interrupted = True
        self.streams.interrupt()

    @property
    def num_prompt_tokens(self) -> int:
        # Usage counts each prompt once, whatever n is (as OpenAI and vLLM do).
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    def usage(self) -> UsageInfo:
        prompt, output = self.num_prompt_tokens, self.num_output_tokens
        # Cached tokens per prompt, like prompt_tokens: from its first choice (forks share its prefill).
        cached = sum(self.choices[p * self.n].num_cached_tokens for p in range(len(self.prompts)))
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=output,
            total_tokens=prompt + output,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice in arrival order; the last delta of a choice has finish_reason set."""
        rejected = False
        self.admission.track(self)
        timer = None
        if self.timeout is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, self.timeout), self.interrupt)
        try:
            async for index, output in self.streams:
                choice = self.choices[index]
                delta = self._process(choice, output)
                if delta.finish_reason is not None and not output.finished:
                    await self.streams.stop(index)  # a stop string matched: abort in the engine
                if delta.finish_reason is not None or delta.text or delta.logprobs or delta.token_ids:
                    yield delta
            if self.interrupted:
                await self.streams.aclose()  # abort the engine requests before answering
                for choice in self.choices:
                    if choice.finish_reason is None:
                        yield self._finish(choice, "abort", choice.stops.flush() if choice.detok else "")
        except InputRejected as exc:
            rejected = True
            raise bad_request(str(exc), param=exc.param) from exc
        finally:
            if timer is not None:
                timer.cancel()
            await self.streams.aclose()
            self.admission.untrack(self)
            self.admission.release(self.fanout, self.client)
            # Choices cut short (client gone, another choice failed) count as aborted requests.
            for choice in self.choices:
                if choice.finish_reason is None and not rejected:
                    choice.finish_reason = "abort"
                    self.metrics.observe_finish("abort", time.monotonic() - choice.start_time)

    def _finish(self, choice: ChoiceState, reason: str, text: str) -> ChoiceDelta:
        """The last delta of a choice the engine did not finish (interrupted)."""
        choice.finish_reason = reason
        self.metrics.observe_finish(reason, time.monotonic() - choice.start_time)
        logprobs, choice.pending_logprobs = choice.pending_logprobs, []
        token_ids, choice.pending_token_ids = choice.pending_token_ids, []
        return ChoiceDelta(choice.index, text, token_ids, logprobs, reason, None)

    def _process(self, choice: ChoiceState, output: RequestOutput) -> ChoiceDelta:
        now = time.monotonic()
        if output.finish_reason == FinishReason.ERROR or (output.error is not None and not output.finished):
            # Counted under its own reason: an engine failure is not a client abort.
            choice.finish_reason = "error"
            self.metrics.observe_finish("error", now - choice.start_time)
            logger.error("request %s-%d failed in the engine: %s", self.request_id, choice.index, output.error)
            raise EngineFailure(output.error or "the engine failed on this request")
        if output.prompt_logprobs is not None and choice.prompt_logprobs is None:
            choice.prompt_logprobs = [None if lp is None else finite_logprob(lp) for lp in output.prompt_logprobs]
        new_ids = list(output.new_token_ids)
        if new_ids:
            if choice.first_token_time is None:
                choice.first_token_time = now
                self.metrics.observe_ttft(now - choice.start_time)
            elif choice.last_token_time is not None:
                gap = (now - choice.last_token_time) / len(new_ids)
                for _ in new_ids:
                    self.metrics.observe_itl(gap)
            choice.last_token_time = now
        choice.token_ids.extend(new_ids)
        choice.pending_token_ids.extend(new_ids)
        choice.num_output_tokens = output.num_output_tokens or len(choice.token_ids)
        choice.num_cached_tokens = max(choice.num_cached_tokens, output.num_cached_tokens)
        if choice.want_logprobs and output.new_logprobs:
            choice.pending_logprobs.extend(finite_logprob(lp) for lp in output.new_logprobs)

        text = ""
        if choice.detok is not None:
            piece = choice.detok.step(new_ids)
            if output.finished:
                piece += choice.detok.flush()
            text = choice.stops.feed(piece, check=choice.num_output_tokens >= self.min_tokens)
        finish: str | None = None
        if choice.stops.match is not None:
            finish = "stop"
            choice.stop_reason = choice.stops.match.stop
        elif output.finished:
            text += choice.stops.flush()
            finish = finish_reason_name(output.finish_reason) or "stop"
            if finish == "stop" and new_ids and new_ids[-1] in self.stop_token_ids:
                choice.stop_reason = new_ids[-1]
        logprobs: list[TokenLogprob] = []
        token_ids: list[int] = []
        if text or finish is not None or choice.detok is None:
            logprobs, choice.pending_logprobs = choice.pending_logprobs, []
            token_ids, choice.pending_token_ids = choice.pending_token_ids, []
        if finish is not None:
            choice.finish_reason = finish
            self.metrics.observe_finish(finish, now - choice.start_time)
        return ChoiceDelta(choice.index, text, token_ids, logprobs, finish, choice.stop_reason)


def check_state_options(engine: EngineClient, body: SamplingRequest) -> None:
    """400 for ``initial_state`` on an engine that cannot start from saved states."""
    if body.initial_state is not None and not getattr(engine, "takes_state_options", False):
        raise bad_request("this server cannot start a request from a saved state", param="initial_state")


def engine_options(engine: EngineClient, body: SamplingRequest, fork_of: str | None) -> dict[str, str]:
    """``generate``'s keywords for an n > 1 fork and an initial state, for engines that take them
    (``takes_state_options``; the others run every choice on its own)."""
    options: dict[str, str] = {}
    if not getattr(engine, "takes_state_options", False):
        return options
    if fork_of is not None:
        options["fork_of"] = fork_of
    if body.initial_state is not None:
        options["initial_state"] = body.initial_state
    return options


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)


def build_sampling_params(
    body: SamplingRequest,
    *,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    defaults: SamplingDefaults,
    vocab_size: int,
) -> SamplingParams:
    """SamplingParams from the OpenAI fields, ``defaults`` for those the body leaves out; range
    errors come back as 400 with the parameter."""
    logit_bias = parse_logit_bias(body.logit_bias, vocab_size)
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            min_tokens=body.min_tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            min_p=defaults.min_p if body.min_p is None else body.min_p,
            repetition_penalty=defaults.repetition_penalty
            if body.repetition_penalty is None
            else body.repetition_penalty,
            presence_penalty=0.0 if body.presence_penalty is None else body.presence_penalty,
            frequency_penalty=0.0 if body.frequency_penalty is None else body.frequency_penalty,
            seed=body.seed,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            logit_bias=logit_bias,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except SamplingParamsError as exc:
        raise bad_request(str(exc), param=exc.param) from exc


def parse_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` object (token ids as strings) as (id, bias) pairs; 400 for a key that is
    not a token id of this vocabulary (the bias range is SamplingParams' check). Two keys of one id
    ("7" and "07"): the later one counts."""
    biases: dict[int, float] = {}
    for key, bias in (logit_bias or {}).items():
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < vocab_size:
            raise bad_request(
                f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})", param="logit_bias"
            )
        biases[token] = float(bias)
    return tuple(sorted(biases.items()))


def check_prompt(
    token_ids: list[int], *, vocab_size: int, max_model_len: int | None, max_tokens: int | None, param: str
) -> None:
    """400 for an empty prompt, an id outside the vocabulary, or a request over the context limit."""
    if not token_ids:
        raise bad_request("the prompt is empty", param=param)
    bad = next((t for t in token_ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of the vocabulary (0..{vocab_size - 1})", param=param)
    if max_model_len is not None:
        if len(token_ids) >= max_model_len:  # at least one token must fit after the prompt
            raise bad_request(
                f"this model's maximum context length is {max_model_len} tokens, "
                f"but the prompt has {len(token_ids)} tokens (it must leave room for one generated token)",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and len(token_ids) + max_tokens > max_model_len:
            raise bad_request(
                f"this model's maximum context length is {max_model_len} tokens, but you requested "
                f"{len(token_ids) + max_tokens} tokens ({len(token_ids)} in the prompt, {max_tokens} "
                "for the completion); reduce the prompt or max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )


def default_chat_max_tokens(prompt_len: int, max_model_len: int | None) -> int | None:
    """max_tokens of a chat request that gives none: DEFAULT_CHAT_MAX_TOKENS, or what the context
    leaves when that is less (None when it leaves nothing: the engine stops at max_model_len)."""
    if max_model_len is None:
        return DEFAULT_CHAT_MAX_TOKENS
    left = max_model_len - prompt_len
    return min(DEFAULT_CHAT_MAX_TOKENS, left) if left >= 1 else None


def engine_error(exc: EngineFailure) -> APIError:
    # The cause is in the server log (see Generation._process); it is not the client's business.
    return APIError(500, "the engine failed on this request (logged on the server)", code="engine_error")


def stream_error(exc: Exception) -> APIError:
    """The error event for a failure after a stream has started."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineFailure):
        return engine_error(exc)
    logger.error("stream failed", exc_info=exc)
    return APIError(500, "internal error (logged on the server)", code="internal_error")


async def stream_response(
    gen: Generation,
    events: Callable[[ChoiceDelta], list[bytes]],
    usage_chunk: Callable[[UsageInfo], BaseModel] | None,
) -> StreamingResponse:
    """Both endpoints' SSE response: the events of every delta, then the usage chunk (when asked),
    then ``[DONE]``. The first delta is awaited before the response starts, so a request the engine
    rejects still gets a proper status rather than an error event in a 200 stream; a failure after
    the headers are out goes out as an error event before ``[DONE]``."""
    deltas = gen.deltas()
    try:
        first = await deltas.__anext__()
    except EngineFailure as exc:
        raise engine_error(exc) from exc

    async def body() -> AsyncIterator[bytes]:
        try:
            for event in events(first):
                yield event
            async for delta in deltas:
                for event in events(delta):
                    yield event
            if usage_chunk is not None:
                yield sse(usage_chunk(gen.usage()))
        except Exception as exc:
            yield sse(stream_error(exc).body())
        finally:
            await deltas.aclose()
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
