"""Scheduling, state memory, the model runner, sampling and the step loop (sync and async)."""

from rnnserve.engine.engine import AsyncEngine, EngineInputError, EngineStats, LLMEngine
from rnnserve.engine.request import FinishReason, RequestOutput, SamplingParams, SamplingParamsError, TokenLogprob

__all__ = [
    "AsyncEngine",
    "EngineInputError",
    "EngineStats",
    "FinishReason",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
    "TokenLogprob",
]
