"""The ``rnnserve`` command: ``serve``, ``complete``, and dispatch to ``chat`` and ``bench <name>``.

Every ``serve`` flag maps to one field of a config in ``rnnserve.config``. Heavy imports (torch,
the engine, FastAPI) happen inside ``serve`` so that ``rnnserve chat`` and ``complete`` start fast.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import pkgutil
import re
import socket
import sys
from dataclasses import dataclass, field

from rnnserve import __version__
from rnnserve.config import (
    ConfigError,
    KVCacheConfig,
    ModelConfig,
    PrefixCacheConfig,
    RayConfig,
    RunnerConfig,
    SchedulerConfig,
    ServerConfig,
    StatePoolConfig,
    default_allowed_hosts,
)
from rnnserve.console import (
    OPTIONAL_PACKAGES,
    ArgumentParser,
    CLIError,
    api_key_from_env,
    error_message,
    missing_package_message,
    print_error,
    require,
    v1_url,
)

logger = logging.getLogger("rnnserve")

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``2GiB`` -> 2147483648, ``512MB`` -> 512000000, ``1.5G`` -> 1500000000, ``4096`` -> 4096."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 4096, 512MiB, 2GiB, 1.5GB)")
    value = int(float(m.group(1)) * _BYTE_UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return value


def parse_autoscale(text: str) -> tuple[int, int]:
    """``1:4`` -> (1, 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX replicas (e.g. 1:4)")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class ServeConfigs:
    model: ModelConfig
    pool: StatePoolConfig
    scheduler: SchedulerConfig
    runner: RunnerConfig
    server: ServerConfig
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    state_dir: str | None = None  # --state-dir: named initial states
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        # Replicas would share one folder, each loading and deleting the others' snapshot files, and a
        # replica Ray restarts has a new identity, so a per-replica folder would not be found again.
        if self.ray.enabled and self.prefix_cache.cache_dir is not None:
            raise ConfigError("--prefix-cache-dir cannot be used with --ray (replicas would share one folder)")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d_model, d_pool, d_sched, d_run, d_srv = (
        ModelConfig(),
        StatePoolConfig(),
        SchedulerConfig(),
        RunnerConfig(),
        ServerConfig(),
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the embedded default model)")
    g.add_argument("--served-model-name", default=None, help="model id clients use (default: --model as given)")
    g.add_argument(
        "--dtype",
        default=d_model.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on the CPU, bfloat16 on CUDA",
    )
    g.add_argument("--device", default=d_model.device, help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:1")
    g.add_argument(
        "--kernels",
        default=d_model.kernels,
        choices=["auto", "torch", "triton"],
        help="auto: triton on CUDA, torch elsewhere",
    )
    g.add_argument(
        "--quantization",
        default=d_model.quantization,
        choices=["none", "int8"],
        help="int8: int8 weights (per output channel) in the linear layers, CPU and float32 only "
        "(Mamba, Mamba-2, RWKV-4/7, RetNet, DenseSSM, LLaMA)",
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer folder, 'gpt-neox-20b' or 'rwkv-world'")
    g.add_argument("--chat-template", default=None, help="Jinja chat template file overriding the tokenizer's")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=d_pool.max_num_seqs, help="state slots / concurrent sequences")
    g.add_argument("--state-memory", type=parse_bytes, default=None, help="state pool budget in bytes, e.g. 2GiB")
    g.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help="KV-cache budget of attention layers (Transformer baseline, hybrids), e.g. 4GiB "
        "(default: every slot at --max-model-len, at most half the memory available at startup)",
    )
    g.add_argument("--block-size", type=int, default=KVCacheConfig().block_size, help="tokens per KV-cache block")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d_sched.max_num_batched_tokens,
        help="tokens per engine step (decodes + prefill chunks)",
    )
    g.add_argument(
        "--prefill-pack-tokens",
        type=int,
        default=d_sched.prefill_pack_tokens,
        help="a step takes another prompt only while its prompt tokens are fewer (default: 64 on a CPU, so "
        "prompts that arrive together finish one after another; the whole step budget on a GPU)",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: none)")
    g.add_argument("--enforce-eager", action="store_true", default=d_run.enforce_eager, help="no CUDA graphs")
    g.add_argument(
        "--compile", action="store_true", default=d_run.compile_cpu_decode, help="torch.compile the CPU decode step"
    )
    g.add_argument(
        "--cpu-decode",
        choices=("auto", "torch", "fused"),
        default="auto",
        help="CPU decode step. auto (default): the fused C++ kernels where they apply (fp32 or int8 Mamba, Mamba-2, "
        "RWKV-4/7, RetNet, DenseSSM, LLaMA on the CPU; AVX2), else torch ops; without a current build in torch's "
        "extension cache (make install makes one) the kernels build in the background (g++, 1-3 min) and the "
        "torch path decodes until they are ready. fused: the fused kernels, built at start-up if needed. torch: "
        "torch ops. The fused kernels keep a second, packed copy of the weight matrices and the head "
        "(about the model's size again: +489 MiB for Mamba-130m in fp32, +136 MiB in int8)",
    )
    g.add_argument(
        "--max-graph-batch-size", type=int, default=d_run.max_graph_batch_size, help="largest CUDA-graph batch"
    )
    d_cache = PrefixCacheConfig()
    g = p.add_argument_group("prefix state cache")
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d_cache.enabled,
        help="resume requests from cached states of their longest seen prefix (default: on)",
    )
    g.add_argument(
        "--prefix-cache-interval",
        type=int,
        default=d_cache.interval,
        help="tokens between state snapshots during a long prefill",
    )
    g.add_argument(
        "--prefix-cache-memory",
        type=parse_bytes,
        default=d_cache.device_memory,
        help="snapshot budget on the model's device, e.g. 1GiB; least recently used spill to host",
    )
    g.add_argument(
        "--prefix-cache-host-memory",
        type=parse_bytes,
        default=d_cache.host_memory,
        help="snapshot budget in host RAM, e.g. 4GiB; least recently used are evicted",
    )
    g.add_argument("--prefix-cache-dir", default=None, help="keep snapshots in this folder across restarts")
    g.add_argument("--state-dir", default=None, help="folder of named initial states (initial_state, POST /v1/states)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d_srv.host)
    g.add_argument("--port", type=int, default=d_srv.port)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env RNNSERVE_API_KEY)")
    g.add_argument(
        "--max-request-bytes",
        type=parse_bytes,
        default=d_srv.max_request_bytes,
        help="largest request body in bytes, e.g. 4MiB",
    )
    g.add_argument("--log-level", default=d_srv.log_level, choices=["debug", "info", "warning", "error", "critical"])
    g = p.add_argument_group("admission and hardening")
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=d_srv.max_queued_requests,
        help="sequences that may wait for a state slot; past it 429 + Retry-After (default: as many as slots)",
    )
    g.add_argument(
        "--max-fanout", type=int, default=d_srv.max_fanout, help="most sequences (prompts x n) in one request"
    )
    g.add_argument(
        "--max-in-flight-per-client",
        type=int,
        default=d_srv.max_in_flight_per_client,
        help="sequences one client (OpenAI 'user', else address) may have running or queued; past it 429 "
        "(default: every slot plus half the queue; 0: no per-client share)",
    )
    g.add_argument(
        "--request-timeout", type=float, default=None, help="seconds; a request still running ends with 'abort'"
    )
    g.add_argument(
        "--allowed-hosts",
        type=_csv,
        default=None,
        help="comma-separated Host names served ('*' = any; default: bound to loopback, it and the localhost names)",
    )
    g.add_argument(
        "--allowed-origins",
        type=_csv,
        default=d_srv.allowed_origins,
        help="comma-separated CORS origins (default: no CORS)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d_srv.shutdown_timeout,
        help="seconds running requests get to finish after SIGTERM/SIGINT before they end with 'abort'",
    )
    g.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=d_srv.keep_alive_timeout,
        help="seconds an idle connection stays open",
    )
    g.add_argument(
        "--read-timeout",
        type=float,
        default=d_srv.read_timeout,
        help="seconds a client has to send a request's headers, and again its body",
    )

    g = p.add_argument_group("scale out (Ray Serve; needs the 'ray' extra)")
    g.add_argument("--ray", action="store_true", help="serve engine replicas on Ray Serve behind one endpoint")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto', HOST:PORT); default: start one")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas (each one model copy)")
    g.add_argument("--autoscale", type=parse_autoscale, default=None, help="MIN:MAX replicas, on ongoing requests")
    g.add_argument("--threads-per-replica", type=int, default=1, help="torch threads / Ray CPUs per CPU replica")


def configs_from_args(args: argparse.Namespace) -> ServeConfigs:
    """One flag, one field. Raises ConfigError for values out of range."""
    return ServeConfigs(
        model=ModelConfig(
            model=args.model,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            device=args.device,
            kernels=args.kernels,
            tokenizer=args.tokenizer,
            chat_template=args.chat_template,
            quantization=args.quantization,
        ),
        pool=StatePoolConfig(max_num_seqs=args.max_num_seqs, state_memory=args.state_memory),
        kv_cache=KVCacheConfig(kv_cache_memory=args.kv_cache_memory, block_size=args.block_size),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            prefill_pack_tokens=args.prefill_pack_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
        ),
        runner=RunnerConfig(
            enforce_eager=args.enforce_eager,
            compile_cpu_decode=args.compile,
            cpu_decode=args.cpu_decode,
            max_graph_batch_size=args.max_graph_batch_size,
        ),
        prefix_cache=PrefixCacheConfig(
            enabled=args.enable_prefix_caching,
            interval=args.prefix_cache_interval,
            device_memory=args.prefix_cache_memory,
            host_memory=args.prefix_cache_host_memory,
            cache_dir=args.prefix_cache_dir,
        ),
        state_dir=args.state_dir,
        server=ServerConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key or api_key_from_env(server=True),
            max_request_bytes=args.max_request_bytes,
            log_level=args.log_level,
            max_queued_requests=args.max_queued_requests,
            max_fanout=args.max_fanout,
            max_in_flight_per_client=args.max_in_flight_per_client,
            request_timeout=args.request_timeout,
            allowed_hosts=args.allowed_hosts if args.allowed_hosts is not None else default_allowed_hosts(args.host),
            allowed_origins=args.allowed_origins,
            shutdown_timeout=args.shutdown_timeout,
            keep_alive_timeout=args.keep_alive_timeout,
            read_timeout=args.read_timeout,
        ),
        ray=RayConfig(
            enabled=args.ray,
            address=args.ray_address,
            num_replicas=args.num_replicas,
            autoscale=args.autoscale,
            threads_per_replica=args.threads_per_replica,
        ),
    )


def serve(cfg: ServeConfigs, sock: socket.socket | None = None) -> int:
    """Load the model and serve it; on ``sock`` when given (bound before the load, see
    rnnserve.preflight), else on the configured host and port."""
    import dataclasses
    from pathlib import Path

    from rnnserve.engine.engine import AsyncEngine
    from rnnserve.server.app import build_app
    from rnnserve.server.run import run
    from rnnserve.server.tokenizer import load_tokenizer

    model_cfg = cfg.model
    name = model_cfg.served_model_name or model_cfg.model
    if model_cfg.model is None:
        from rnnserve.models.default import ensure_default_model

        try:
            default_path = ensure_default_model()
        except RuntimeError as exc:  # an incomplete install: one line, not a traceback
            raise CLIError(str(exc)) from exc
        model_cfg = dataclasses.replace(model_cfg, model=str(default_path))
        name = name or Path(default_path).name
    engine = AsyncEngine.from_configs(
        model_cfg,
        cfg.pool,
        cfg.scheduler,
        cfg.runner,
        prefix_cache_config=cfg.prefix_cache,
        state_dir=cfg.state_dir,
        kv_cache_config=cfg.kv_cache,
    )
    model_path = engine.loaded.path if engine.loaded is not None else Path(str(model_cfg.model))
    tokenizer = load_tokenizer(model_path, model_cfg.tokenizer, model_cfg.chat_template)
    stats = engine.stats()
    logger.info(
        "state pool: %d slots x %d bytes per sequence; max_model_len=%s",
        stats.num_slots,
        stats.state_bytes_per_slot,
        engine.max_model_len,
    )
    app = build_app(engine, tokenizer, model_name=str(name), model_root=str(model_path), server_config=cfg.server)
    run(app, cfg.server, sockets=None if sock is None else [sock])  # drains on SIGTERM / SIGINT
    return 0


def complete(argv: list[str]) -> int:
    """``rnnserve complete --base-url URL "prompt"``: one streamed completion, printed as it comes."""
    import json

    require("httpx", "rnnserve complete")
    import httpx

    p = ArgumentParser(prog="rnnserve complete", description="stream one completion from a server")
    p.add_argument("prompt")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a /v1 suffix is fine)")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None, help="default: $RNNSERVE_API_KEY, else $OPENAI_API_KEY")
    args = p.parse_args(argv)
    base = v1_url(args.base_url)
    api_key = args.api_key or api_key_from_env()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        try:
            if args.model:
                model = args.model
            else:
                resp = client.get("/models")
                if resp.status_code != 200:
                    raise CLIError(f"GET {base}/models: HTTP {resp.status_code}: {error_message(resp.text)}")
                model = resp.json()["data"][0]["id"]
            body = {
                "model": model,
                "prompt": args.prompt,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "stream": True,
            }
            with client.stream("POST", "/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise CLIError(f"HTTP {resp.status_code}: {error_message(resp.text)}")
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        sys.stdout.write("\n")
                        raise CLIError(f"the server stopped the completion: {event['error'].get('message')}")
                    for choice in event.get("choices", []):
                        sys.stdout.write(choice.get("text", ""))
                        sys.stdout.flush()
        except httpx.HTTPError as exc:
            raise CLIError(f"cannot reach {base}: {exc}") from exc
    sys.stdout.write("\n")
    return 0


def _dispatch(module: str, argv: list[str]) -> int:
    main = importlib.import_module(module).main
    return int(main(argv) or 0)


def benchmarks() -> dict[str, str]:
    """Every ``rnnserve.bench.<name>`` module and the first line of its docstring (read, not
    imported: a benchmark's optional packages may be missing)."""
    import rnnserve.bench

    out = {}
    for info in pkgutil.iter_modules(rnnserve.bench.__path__):
        spec = importlib.util.find_spec(f"rnnserve.bench.{info.name}")
        doc = ""
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ").replace("``", "")
        out[info.name] = summary.split(": ", 1)[1] if summary.startswith("rnnserve bench") else summary
    return out


def bench_usage() -> str:
    lines = ["usage: rnnserve bench <name> [args...]   (rnnserve bench <name> --help: its flags)", "", "benchmarks:"]
    lines += [f"  {name:<11} {summary}" for name, summary in sorted(benchmarks().items())]
    return "\n".join(lines)


def bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(bench_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0]
    known = benchmarks()
    if name not in known:
        raise CLIError(f"no benchmark named {name!r}; there are: {', '.join(sorted(known))}", status=2)
    return _dispatch(f"rnnserve.bench.{name}", argv[1:])


# ConfigError names config fields; the user typed flags. The fields whose flag is not their name.
_FIELD_FLAGS = {"compile_cpu_decode": "--compile"}


def flag_names(message: str) -> str:
    """``max_num_seqs must be >= 1`` -> ``--max-num-seqs must be >= 1``: every snake_case word that
    is a serve flag's field, and a leading one-word field (``port must be ...``)."""
    p = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(p)
    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings} | _FIELD_FLAGS

    def sub(m: re.Match[str]) -> str:
        word = m.group(0)
        return flags[word] if word in flags and ("_" in word or m.start() == 0) else word

    return re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*\b", sub, message)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rnnserve", description="An inference server for recurrent language models.")
    p.add_argument("--version", action="version", version=f"rnnserve {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_arguments(sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API"))
    sub.add_parser("complete", help="stream one completion from a running server", add_help=False)
    sub.add_parser("chat", help="streaming terminal chat with a running server", add_help=False)
    sub.add_parser("bench", help="benchmarks: rnnserve bench --help lists them", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every command's user mistakes end here as one line, ``rnnserve: error: ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except CLIError as exc:
        print_error(str(exc))
        return exc.status
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        command = " ".join(["rnnserve", *argv[: 2 if argv[:1] == ["bench"] else 1]])
        print_error(missing_package_message(package, command))
        return 1


def _main(argv: list[str]) -> int:
    # Subcommands with their own parsers get their arguments untouched.
    if argv and argv[0] == "chat":
        return _dispatch("rnnserve.clients.chat", argv[1:])
    if argv and argv[0] == "complete":
        return complete(argv[1:])
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        cfg = configs_from_args(args)
    except ConfigError as exc:
        raise CLIError(f"{flag_names(str(exc))} (see rnnserve serve --help)", status=2) from exc
    if cfg.ray.enabled:
        require("ray", "rnnserve serve --ray")
        from rnnserve.deploy.ray_serve import serve_on_ray

        return serve_on_ray(cfg)
    from rnnserve.models.loader import ModelLoadError
    from rnnserve.models.registry import UnsupportedModelError
    from rnnserve.preflight import bind_socket, check_device
    from rnnserve.server.tokenizer import TokenizerLoadError

    try:
        # Before the model loads: an impossible device or a taken port fails in a second.
        check_device(cfg.model)
        sock = bind_socket(cfg.server)
    except ConfigError as exc:
        raise CLIError(str(exc), status=2) from exc
    try:
        return serve(cfg, sock)
    except (ModelLoadError, UnsupportedModelError, TokenizerLoadError) as exc:
        raise CLIError(str(exc)) from exc
    except ConfigError as exc:
        raise CLIError(flag_names(str(exc))) from exc
    finally:
        sock.close()
