"""Small frozen configs, one per component, validated at construction.

Each CLI flag maps to exactly one field. A component takes its own config and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["float32", "bfloat16", "float16", "auto"]
KernelBackend = Literal["auto", "torch", "triton"]
Quantization = Literal["none", "int8"]
CPUDecode = Literal["torch", "fused", "auto"]


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
    quantization: Quantization = "none"  # int8: int8 weights in the linear layers (CPU, float32 models)

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "bfloat16", "float16", "auto"), f"bad dtype {self.dtype!r}")
        _require(self.kernels in ("auto", "torch", "triton"), f"bad kernels {self.kernels!r}")
        _require(self.quantization in ("none", "int8"), f"bad quantization {self.quantization!r}")


@dataclass(frozen=True)
class StatePoolConfig:
    """Capacity of the state pool: ``--max-num-seqs`` slots, fewer if ``--state-memory`` (bytes) holds fewer."""

    max_num_seqs: int = 64
    state_memory: int | None = None  # bytes; when set, capacity = min(max_num_seqs, state_memory // bytes_per_slot)

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(self.state_memory is None or self.state_memory > 0, "state_memory must be > 0")


@dataclass(frozen=True)
class KVCacheConfig:
    """The paged KV cache of attention layers (``--kv-cache-memory`` bytes, ``--block-size`` tokens per
    block). Without a memory budget it holds every slot at ``--max-model-len``, within half the memory
    available when it is made (free GPU memory on CUDA, MemAvailable on the host)."""

    kv_cache_memory: int | None = None
    block_size: int = 16

    def __post_init__(self) -> None:
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory must be > 0")
        _require(1 <= self.block_size <= 1024, "block_size must be in 1..1024")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step token budget and limits (``--max-num-batched-tokens``, ``--prefill-pack-tokens``,
    ``--max-model-len``)."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: no limit (a recurrent state does not grow)
    # A step takes another prompt's chunk only while its prompt tokens are fewer than this. None: 64
    # on a CPU (a step's time grows with its tokens, so prompts finish one after another), the whole
    # budget elsewhere (a GPU step of many prompts costs about what one of few does).
    prefill_pack_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _require(self.prefill_pack_tokens is None or self.prefill_pack_tokens >= 1, "prefill_pack_tokens must be >= 1")
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
    """How the model runs (``--enforce-eager``, ``--compile``, ``--cpu-decode``, CUDA-graph batch ladder)."""

    enforce_eager: bool = False
    compile_cpu_decode: bool = False
    # fused: the float32 decode step in one C++ call (kernels/cpu_decode; Mamba, Mamba-2, RWKV, RetNet, DenseSSM,
    # the LLaMA baseline), built at start-up; auto: fused where it applies, prepared in the background while
    # the torch path decodes (engine/cpu_decode_auto.py). The server's flag defaults to auto; this default
    # stays torch so that engine tests run one decode path, without a background thread switching it.
    cpu_decode: CPUDecode = "torch"
    max_graph_batch_size: int = 256

    def __post_init__(self) -> None:
        _require(self.max_graph_batch_size >= 1, "max_graph_batch_size must be >= 1")
        _require(
            self.cpu_decode in ("torch", "fused", "auto"), f"bad cpu_decode {self.cpu_decode!r} (torch, fused or auto)"
        )
        _require(
            not (self.compile_cpu_decode and self.cpu_decode == "fused"),
            "compile_cpu_decode and cpu_decode fused are two CPU decode paths: pick one",
        )


LOCALHOST_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
    """``--allowed-hosts`` when not given: bound to loopback, the bound host and the localhost names
    (a page on another site that rebinds its DNS name to 127.0.0.1 sends its own name as Host);
    bound elsewhere, any Host (None)."""
    if host.lower() in (*LOCALHOST_NAMES, "ip6-localhost") or host.startswith("127."):
        return tuple(dict.fromkeys((host.lower(), *LOCALHOST_NAMES)))
    return None


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front (``--host``, ``--port``, ``--api-key``, ``--max-request-bytes``), admission control
    (``--max-queued-requests``, ``--max-fanout``, ``--request-timeout``), browser protection
    (``--allowed-hosts``, ``--allowed-origins``) and connection lifetimes (``--shutdown-timeout``,
    ``--keep-alive-timeout``, ``--read-timeout``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    log_requests: bool = False
    log_level: str = "info"  # --log-level: debug, info, warning, error, critical
    max_queued_requests: int | None = None  # engine requests waiting for a slot; None: as many as slots
    max_fanout: int = 128  # engine requests (prompts x n) one HTTP request may ask for
    # Engine requests one client (``user``, else address) may hold in flight; None: every slot plus half
    # the queue, so another client always finds room in the queue; 0: no per-client share.
    max_in_flight_per_client: int | None = None
    request_timeout: float | None = None  # seconds; past it a request ends with finish_reason "abort"
    # Host header values served (port ignored; "*" = any). None: any; the CLI's default is the bound
    # host plus the localhost names when it binds a loopback address (DNS rebinding).
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS origins; none = no CORS headers at all
    shutdown_timeout: float = 10.0  # seconds running requests get to finish after SIGTERM / SIGINT
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    read_timeout: float = 30.0  # seconds to send a request's headers, and again its body

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port must be in 0..65535")
        _require(self.max_request_bytes > 0, "max_request_bytes must be > 0")
        _require(self.max_queued_requests is None or self.max_queued_requests >= 0, "max_queued_requests must be >= 0")
        _require(self.max_fanout >= 1, "max_fanout must be >= 1")
        _require(
            self.max_in_flight_per_client is None or self.max_in_flight_per_client >= 0,
            "max_in_flight_per_client must be >= 0",
        )
        _require(self.request_timeout is None or self.request_timeout > 0, "request_timeout must be > 0")
        _require(self.shutdown_timeout >= 0, "shutdown_timeout must be >= 0")
        _require(self.keep_alive_timeout > 0, "keep_alive_timeout must be > 0")
        _require(self.read_timeout > 0, "read_timeout must be > 0")
        _require(
            self.log_level in ("debug", "info", "warning", "error", "critical"),
            f"bad log_level {self.log_level!r}; expected debug, info, warning, error or critical",
        )


@dataclass(frozen=True)
class RayConfig:
    """Scale-out on Ray Serve (``--ray``, ``--ray-address``, ``--num-replicas``, ``--autoscale``,
    ``--threads-per-replica``): engine replicas behind one OpenAI endpoint."""

    enabled: bool = False
    address: str | None = None  # None: start a local Ray cluster; "auto" or HOST:PORT joins a running one
    num_replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests
    threads_per_replica: int = 1  # torch threads (and Ray CPUs) of each CPU replica

    def __post_init__(self) -> None:
        _require(self.num_replicas >= 1, "num_replicas must be >= 1")
        _require(self.threads_per_replica >= 1, "threads_per_replica must be >= 1")
        if self.autoscale is not None:
            low, high = self.autoscale
            _require(1 <= low <= high, f"autoscale MIN:MAX needs 1 <= MIN <= MAX, got {low}:{high}")
