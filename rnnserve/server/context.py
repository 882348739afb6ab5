"""What every endpoint needs: the engine, the tokenizer, metrics and the served model's identity."""

from __future__ import annotations

from dataclasses import dataclass, field

from rnnserve.server.admission import Admission, unbounded
from rnnserve.server.engine_client import EngineClient
from rnnserve.server.errors import APIError, bad_request
from rnnserve.server.metrics import ServerMetrics
from rnnserve.server.sampling_defaults import SamplingDefaults
from rnnserve.server.tokenizer import Tokenizer


@dataclass(frozen=True)
class ServingContext:
    engine: EngineClient
    tokenizer: Tokenizer | None
    metrics: ServerMetrics
    model_name: str
    model_root: str  # the checkpoint folder: accepted as a model id, never shown to clients
    admission: Admission = field(default_factory=unbounded)
    request_timeout: float | None = None  # seconds; a request still running then ends with "abort"
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # fields a request leaves out

    @property
    def max_model_len(self) -> int | None:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def check_model(self, model: str | None) -> None:
        """404 for a model this server does not serve (no model given means the served one)."""
        if model is not None and model not in (self.model_name, self.model_root):
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def require_tokenizer(self, what: str, param: str | None = None) -> Tokenizer:
        if self.tokenizer is None:
            raise bad_request(
                f"this model has no tokenizer, so {what} cannot be used; send token ids, or restart "
                "the server with --tokenizer",
                param=param,
            )
        return self.tokenizer

    def token_str(self, token_id: int, as_id: bool = False) -> str:
        """A token for logprobs: its text, or ``token_id:N`` when asked or without a tokenizer."""
        if self.tokenizer is None or as_id:
            return f"token_id:{token_id}"
        return self.tokenizer.token_str(token_id)

    def token_bytes(self, token_id: int) -> list[int] | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.token_bytes(token_id)
