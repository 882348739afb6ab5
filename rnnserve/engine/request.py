"""Requests as the engine sees them: token ids, sampling parameters, progress and slot."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range (the server maps this to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Validated at construction."""

    max_tokens: int | None = 16  # None: until EOS / stop (bounded by max_model_len if set)
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) added to that token's logit before sampling
    # (greedy too: -100 bans a token in practice, +100 forces it); ids outside the vocabulary are ignored.
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0 = only the chosen)
    prompt_logprobs: int | None = None  # same for prompt tokens (echo + logprobs)
    # Who asked (the server's client key: the OpenAI ``user``, else the address). Not a sampling
    # choice: it rides here so every engine client carries it; the scheduler admits round-robin by it.
    client: str = ""

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str, param: str) -> None:
            if not cond:
                raise SamplingParamsError(msg, param)

        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
        check(self.min_tokens >= 0, "min_tokens must be non-negative", "min_tokens")
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens must not exceed max_tokens",
            "min_tokens",
        )
        check(0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]", "temperature")
        check(self.top_k >= -1, "top_k must be -1, 0 (off) or positive", "top_k")
        check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
        check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", "min_p")
        check(0.0 < self.repetition_penalty <= 100.0, "repetition_penalty must be in (0, 100]", "repetition_penalty")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]", "presence_penalty")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]", "frequency_penalty")
        check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]", "logprobs")
        check(
            all(t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
            "logit_bias maps token ids (>= 0) to biases in [-100, 100]",
            "logit_bias",
        )
        check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            "prompt_logprobs must be in [0, 20]",
            "prompt_logprobs",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # no slot yet
    RUNNING = "running"  # holds a slot (prefilling or decoding)
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client went away or server shut down
    ERROR = "error"  # the step failed for this request


@dataclass
class Request:
    """A request inside the engine. Only the engine thread mutates it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose effect is in the slot's state
    slot: int | None = None
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of computed
    initial_state: str | None = None  # a saved state the request starts from (None: the fill values)
    save_state: str | None = None  # save the state after the prompt under this name
    # Prefix-cache tree: "" for requests from the zero state; a prefix run from a saved state is
    # another state, so those get the state's name and content version (a re-saved name is new).
    cache_namespace: str = ""
    # n > 1 by fork: a child waits for its parent's prompt and starts from a copy of its state.
    fork_parent: Request | None = field(default=None, repr=False)
    fork_children: list[Request] = field(default_factory=list, repr=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What the engine streams back per step for one request (deltas, not totals)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; [0] is None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache (usage.prompt_tokens_details)
