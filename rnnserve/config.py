"""Small frozen configs, one per component, validated at construction.

Each CLI flag maps to exactly one field. A component takes its own config and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["float32", "bfloat16", "float16", "auto"]
KernelBackend = Literal["auto", "torch", "triton"]


class ConfigError(ValueError):
    """A configuration value a user gave is invalid."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how (``--model``, ``--dtype``, ``--device``, ``--kernels``)."""

    model: str | None = None  # folder or Hub id; None = the embedded default model
    served_model_name: str | None = None
    dtype: DType = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    kernels: KernelBackend = "auto"  # auto: triton on CUDA, torch elsewhere
    tokenizer: str | None = None  # defaults to the model folder
    chat_template: str | None = None  # a Jinja file overriding the tokenizer's template
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "bfloat16", "float16", "auto"), f"bad dtype {self.dtype!r}")
        _require(self.kernels in ("auto", "torch", "triton"), f"bad kernels {self.kernels!r}")


@dataclass(frozen=True)
class StatePoolConfig:
    """Capacity of the state pool: ``--max-num-seqs`` slots, fewer if ``--state-memory`` (bytes) holds fewer."""

    max_num_seqs: int = 64
    state_memory: int | None = None  # bytes; when set, capacity = min(max_num_seqs, state_memory // bytes_per_slot)

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.state_memory is None or self.state_memory > 0, "state_memory must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step token budget and limits (``--max-num-batched-tokens``, ``--max-model-len``)."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: no limit (a recurrent state does not grow)

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1")


@dataclass(frozen=True)
class PrefixCacheConfig:
    """The prefix state cache (``--enable-prefix-caching``, ``--prefix-cache-interval``,
    ``--prefix-cache-memory``, ``--prefix-cache-host-memory``, ``--prefix-cache-dir``)."""

    enabled: bool = True
    interval: int = 256  # tokens between snapshots during a long prefill
    device_memory: int = 1024**3  # bytes of snapshots on the model's device
    host_memory: int = 4 * 1024**3  # bytes of snapshots in host RAM
    cache_dir: str | None = None  # persist snapshots here (safetensors + index.json)

    def __post_init__(self) -> None:
        _require(self.interval >= 1, "prefix_cache_interval must be >= 1")
        _require(self.device_memory >= 0, "prefix_cache_memory must be >= 0")
        _require(self.host_memory >= 0, "prefix_cache_host_memory must be >= 0")


@dataclass(frozen=True)
class RunnerConfig:
    """How the model runs (``--enforce-eager``, ``--compile``, CUDA-graph batch ladder)."""

    enforce_eager: bool = False
    compile_cpu_decode: bool = False
    max_graph_batch_size: int = 256

    def __post_init__(self) -> None:
        _require(self.max_graph_batch_size >= 1, "max_graph_batch_size must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front (``--host``, ``--port``, ``--api-key``, ``--max-request-bytes``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    log_requests: bool = False
    log_level: str = "info"  # --log-level: debug, info, warning, error, critical

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port must be in 0..65535")
        _require(self.max_request_bytes > 0, "max_request_bytes must be > 0")
        _require(
            self.log_level in ("debug", "info", "warning", "error", "critical"),
            f"bad log_level {self.log_level!r}; expected debug, info, warning, error or critical",
        )
