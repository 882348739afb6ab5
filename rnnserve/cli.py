"""The ``rnnserve`` command: ``serve``, ``complete``, and dispatch to ``chat`` and ``bench <name>``.

Every ``serve`` flag maps to one field of a config in ``rnnserve.config``. Heavy imports (torch,
the engine, FastAPI) happen inside ``serve`` so that ``rnnserve chat`` and ``complete`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field

from rnnserve import __version__
from rnnserve.config import (
    ConfigError,
    ModelConfig,
    PrefixCacheConfig,
    RunnerConfig,
    SchedulerConfig,
    ServerConfig,
    StatePoolConfig,
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


@dataclass(frozen=True)
class ServeConfigs:
    model: ModelConfig
    pool: StatePoolConfig
    scheduler: SchedulerConfig
    runner: RunnerConfig
    server: ServerConfig
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)
    state_dir: str | None = None  # --state-dir: named initial states


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d_model, d_pool, d_sched, d_run, d_srv = (
        ModelConfig(),
        StatePoolConfig(),
        SchedulerConfig(),
        RunnerConfig(),
        ServerConfig(),
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the embedded demo Mamba)")
    g.add_argument("--served-model-name", default=None, help="model id clients use (default: --model as given)")
    g.add_argument("--dtype", default=d_model.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=d_model.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--kernels", default=d_model.kernels, choices=["auto", "torch", "triton"])
    g.add_argument("--tokenizer", default=None, help="tokenizer folder, 'gpt-neox-20b' or 'rwkv-world'")
    g.add_argument("--chat-template", default=None, help="Jinja chat template file overriding the tokenizer's")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=d_pool.max_num_seqs, help="state slots / concurrent sequences")
    g.add_argument("--state-memory", type=parse_bytes, default=None, help="state pool budget in bytes, e.g. 2GiB")
    g.add_argument("--max-num-batched-tokens", type=int, default=d_sched.max_num_batched_tokens)
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: none)")
    g.add_argument("--enforce-eager", action="store_true", default=d_run.enforce_eager, help="no CUDA graphs")
    g.add_argument(
        "--compile", action="store_true", default=d_run.compile_cpu_decode, help="torch.compile the CPU decode step"
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
    g.add_argument("--max-request-bytes", type=parse_bytes, default=d_srv.max_request_bytes)
    g.add_argument("--log-level", default=d_srv.log_level, choices=["debug", "info", "warning", "error", "critical"])


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
        ),
        pool=StatePoolConfig(max_num_seqs=args.max_num_seqs, state_memory=args.state_memory),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
        ),
        runner=RunnerConfig(
            enforce_eager=args.enforce_eager,
            compile_cpu_decode=args.compile,
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
            api_key=args.api_key or os.environ.get("RNNSERVE_API_KEY") or None,
            max_request_bytes=args.max_request_bytes,
            log_level=args.log_level,
        ),
    )


def serve(cfg: ServeConfigs) -> int:
    import dataclasses
    from pathlib import Path

    import uvicorn

    from rnnserve.engine.engine import AsyncEngine
    from rnnserve.server.app import build_app
    from rnnserve.server.tokenizer import load_tokenizer

    model_cfg = cfg.model
    name = model_cfg.served_model_name or model_cfg.model
    if model_cfg.model is None:
        from rnnserve.models.default import ensure_default_model

        default_path = ensure_default_model()
        model_cfg = dataclasses.replace(model_cfg, model=str(default_path))
        name = name or Path(default_path).name
    engine = AsyncEngine.from_configs(
        model_cfg, cfg.pool, cfg.scheduler, cfg.runner, prefix_cache_config=cfg.prefix_cache, state_dir=cfg.state_dir
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
    uvicorn.run(
        app,
        host=cfg.server.host,
        port=cfg.server.port,
        workers=1,
        log_level=cfg.server.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


def complete(argv: list[str]) -> int:
    """``rnnserve complete --base-url URL "prompt"``: one streamed completion, printed as it comes."""
    import json

    import httpx

    p = argparse.ArgumentParser(prog="rnnserve complete", description="stream one completion from a server")
    p.add_argument("prompt")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=os.environ.get("RNNSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    args = p.parse_args(argv)
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        try:
            model = args.model or client.get("/models").raise_for_status().json()["data"][0]["id"]
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
                    print(f"rnnserve complete: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
                    return 1
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        print(f"\nrnnserve complete: {event['error'].get('message')}", file=sys.stderr)
                        return 1
                    for choice in event.get("choices", []):
                        sys.stdout.write(choice.get("text", ""))
                        sys.stdout.flush()
        except httpx.HTTPError as exc:
            print(f"rnnserve complete: cannot reach {base}: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def _dispatch(module: str, argv: list[str]) -> int:
    main = importlib.import_module(module).main
    return int(main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnserve", description="An inference server for recurrent language models.")
    p.add_argument("--version", action="version", version=f"rnnserve {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_arguments(sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API"))
    sub.add_parser("complete", help="stream one completion from a running server", add_help=False)
    sub.add_parser("chat", help="streaming terminal chat with a running server", add_help=False)
    sub.add_parser("bench", help="benchmarks: rnnserve bench <throughput|serve|...> --help", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers get their arguments untouched.
    if argv and argv[0] == "chat":
        return _dispatch("rnnserve.clients.chat", argv[1:])
    if argv and argv[0] == "complete":
        return complete(argv[1:])
    if argv and argv[0] == "bench":
        if len(argv) < 2 or argv[1].startswith("-") or not re.fullmatch(r"[a-z_][a-z0-9_]*", argv[1]):
            print("usage: rnnserve bench <name> [args...]   (e.g. throughput, serve)", file=sys.stderr)
            return 2
        try:
            importlib.import_module(f"rnnserve.bench.{argv[1]}")
        except ModuleNotFoundError:
            print(f"rnnserve bench: no benchmark named {argv[1]!r}", file=sys.stderr)
            return 2
        return _dispatch(f"rnnserve.bench.{argv[1]}", argv[2:])
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
        parser.error(str(exc))
    from rnnserve.models.loader import ModelLoadError
    from rnnserve.models.registry import UnsupportedModelError
    from rnnserve.server.tokenizer import TokenizerLoadError

    try:
        return serve(cfg)
    except (ModelLoadError, UnsupportedModelError, TokenizerLoadError, ConfigError) as exc:
        print(f"rnnserve serve: error: {exc}", file=sys.stderr)
        return 1
