"""``rnnserve bench throughput``: offline prefill and decode tokens/s, ours against transformers.

For each batch size B, B random prompts of ``--prompt-len`` tokens each generate exactly
``--gen-len`` tokens greedily (``ignore_eos``).

- Ours: through ``LLMEngine`` with a token budget that prefills the whole batch in one step, and
  the runner's decode path (CUDA graphs on CUDA unless ``--enforce-eager``; ``--compile`` for the
  torch.compile'd CPU decode). Prefill = time until every request has its first token; decode = the
  rest (B x (gen_len - 1) tokens). One engine per batch size, warmed up at the timed shapes.
- transformers: ``AutoModelForCausalLM`` on the same folder, same dtype and device, one
  ``generate()`` of gen_len tokens timed the same way: prefill until its streamer gets the first
  new tokens, decode the rest. (It was two runs, one token and gen_len, subtracted; on a busy
  machine the difference came out negative and the decode rate NaN.)

Also reports whether both produced the same greedy tokens (they should in float32). Prints a table
and, with ``--json``, writes every figure plus the device name and library versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rnnserve.config import ConfigError, ModelConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.console import ArgumentParser, print_error
from rnnserve.engine.engine import LLMEngine
from rnnserve.engine.request import SamplingParams
from rnnserve.models.loader import LoadedModel, ModelLoadError, load_model, resolve_device, resolve_dtype
from rnnserve.models.registry import UnsupportedModelError
from rnnserve.preflight import check_device


@dataclass(frozen=True)
class Timing:
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self, gen_len: int) -> dict:
        return {
            **asdict(self),
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "decode_ms_per_step": 1000 * self.decode_s / (gen_len - 1),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def make_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Stay clear of the low ids, where special tokens (EOS, padding) usually sit.
    low = min(10, vocab_size - 1)
    return torch.randint(low, vocab_size, (batch_size, prompt_len), generator=gen).tolist()


def make_engine(loaded: LoadedModel, batch_size: int, budget: int, runner_config: RunnerConfig) -> LLMEngine:
    """An engine with one slot per sequence; CUDA-graph capture or compilation happens here, untimed.

    The whole batch is prefilled in one step (``prefill_pack_tokens=budget``): the CPU default, first come
    first prefilled, would let early sequences decode during later prefills, and those tokens would count
    in the decode rate without their time.
    """
    return LLMEngine(
        loaded.model,
        StatePoolConfig(max_num_seqs=batch_size),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=batch_size, prefill_pack_tokens=budget),
        runner_config,
        eos_token_id=loaded.eos_token_id,
    )


def run_engine(engine: LLMEngine, prompts: list[list[int]], gen_len: int) -> tuple[Timing, list[list[int]]]:
    """Generate with our engine; return the timing and each request's tokens."""
    model = engine.model
    b = len(prompts)
    total_prompt = sum(len(p) for p in prompts)
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    device = model.device
    _sync(device)
    t0 = time.perf_counter()
    t_first: float | None = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if t_first is None and len(tokens) == b:
            _sync(device)
            t_first = time.perf_counter()
    _sync(device)
    t_end = time.perf_counter()
    assert t_first is not None
    timing = Timing(t_first - t0, t_end - t_first, total_prompt, b * (gen_len - 1))
    return timing, [tokens[str(i)] for i in range(b)]


def load_hf(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device).eval()


class _FirstTokens:
    """A ``generate()`` streamer that only notes when the first new tokens (one per row) came out:
    ``put`` gets the prompt, then each step's tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.puts = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            _sync(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_hf(
    model: torch.nn.Module, prompts: list[list[int]], gen_len: int, device: torch.device, pad_token_id: int
) -> tuple[Timing, list[list[int]]]:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)  # [B, L], no padding: equal lengths
    # No EOS at all, like our ignore_eos (min_new_tokens would mask EOS instead and change the tokens).
    # generate() fills a None field from the model's own generation config, so clear it there.
    model.generation_config.eos_token_id = None
    # Plain greedy, as our side runs: not the sampling a model's generation_config.json recommends
    # for serving (a repetition_penalty there changes even greedy tokens).
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        setattr(model.generation_config, name, None)
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.update(max_new_tokens=gen_len, min_new_tokens=None, do_sample=False, pad_token_id=pad_token_id)
    mask = torch.ones_like(ids)
    # One generate(), timed as our side is: prefill until every row's first new token, decode the
    # gen_len - 1 steps after it. The streamer gets the prompt first, then each step's tokens.
    clock = _FirstTokens(device)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config, streamer=clock)
    _sync(device)
    t_end = time.perf_counter()
    assert clock.at is not None
    b, length = ids.shape
    timing = Timing(clock.at - t0, t_end - clock.at, b * length, b * (gen_len - 1))
    return timing, out[:, length:].tolist()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="rnnserve bench throughput",
        description="Offline prefill and decode tokens/s of rnnserve's engine against transformers' generate().",
    )
    p.add_argument("--model", default=None, help="checkpoint folder, HF format (default: the embedded default model)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="engine token budget per step (default: the whole batch's prompts, prefilled in one step)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compiled decode")
    p.add_argument("--compile", action="store_true", help="torch.compile the CPU decode step (RunnerConfig)")
    p.add_argument(
        "--cpu-decode",
        default="torch",
        choices=["torch", "fused"],
        help="fused: C++ decode (Mamba, Mamba-2, RWKV-4/7, RetNet, DenseSSM)",
    )
    p.add_argument("--quantization", default="none", choices=["none", "int8"], help="int8: int8 linear weights (CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs at each batch's shapes first (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' generate()")
    return p


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        print_error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
        return 2
    if not batch_sizes or min(batch_sizes) < 1 or args.prompt_len < 1 or args.gen_len < 2:
        print_error("batch sizes and --prompt-len must be >= 1, --gen-len >= 2")
        return 2

    if args.model is None:
        from rnnserve.models.default import ensure_default_model

        args.model = str(ensure_default_model())
    try:
        check_device(ModelConfig(device=args.device, kernels=args.kernels))
        loaded = load_model(
            ModelConfig(
                model=args.model,
                dtype=args.dtype,
                device=args.device,
                kernels=args.kernels,
                quantization=args.quantization,
            )
        )
    except (ConfigError, ModelLoadError, UnsupportedModelError) as exc:
        print_error(str(exc))
        return 2
    model = loaded.model
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    vocab = model.vocab_size
    hf = None if args.no_baseline else load_hf(loaded.path, dtype, device)
    pad = loaded.eos_token_id if loaded.eos_token_id is not None else 0

    runner_config = RunnerConfig(
        enforce_eager=args.enforce_eager, compile_cpu_decode=args.compile, cpu_decode=args.cpu_decode
    )
    results = []
    for b in batch_sizes:
        prompts = make_prompts(b, args.prompt_len, vocab, args.seed)
        engine = make_engine(loaded, b, args.max_num_batched_tokens or b * args.prompt_len, runner_config)
        # Warm-up: ours at the timed shapes (first calls allocate, pick kernels, compile Triton
        # variants); transformers' eager path compiles nothing, so short prompts do (its CPU prefill
        # is a per-token loop: a full-length warm-up would cost minutes).
        for _ in range(args.warmup):
            run_engine(engine, prompts, 2)
            if hf is not None:
                run_hf(hf, [p[:16] for p in prompts], 2, device, pad)
        ours, our_tokens = run_engine(engine, prompts, args.gen_len)
        row: dict = {
            "batch_size": b,
            "engine": ours.as_dict(args.gen_len),
            "hf": None,
            "ratio": None,
            "greedy_match": None,
            "greedy_prefix_match": None,
        }
        if hf is not None:
            theirs, hf_tokens = run_hf(hf, prompts, args.gen_len, device, pad)
            row["hf"] = theirs.as_dict(args.gen_len)
            row["ratio"] = {
                "prefill": ours.prefill_tok_s / theirs.prefill_tok_s,
                "decode": ours.decode_tok_s / theirs.decode_tok_s,
            }
            row["greedy_match"] = sum(a == h for a, h in zip(our_tokens, hf_tokens)) / b
            # Mean share of each sequence before the first differing token (low precision drifts late).
            row["greedy_prefix_match"] = sum(_common_prefix(a, h) for a, h in zip(our_tokens, hf_tokens)) / (
                b * args.gen_len
            )
        results.append(row)
        print(_row_text(row), flush=True)

    report = {
        "model": str(loaded.path),
        "architecture": (loaded.hf_config.get("architectures") or [loaded.hf_config.get("model_type")])[0],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": args.kernels,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "warmup": args.warmup,
        "enforce_eager": args.enforce_eager,
        "compile_cpu_decode": args.compile,
        "cpu_decode": args.cpu_decode,
        "quantization": args.quantization,
        "results": results,
    }
    print(_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _row_text(row: dict) -> str:
    e = row["engine"]
    text = (
        f"batch {row['batch_size']}: rnnserve prefill {e['prefill_tok_s']:,.1f} tok/s, decode {e['decode_tok_s']:,.1f}"
    )
    if row["hf"] is not None:
        h = row["hf"]
        text += f" | transformers prefill {h['prefill_tok_s']:,.1f}, decode {h['decode_tok_s']:,.1f}"
    return text


def _table(report: dict) -> str:
    lines = [
        f"{report['architecture']} ({report['num_parameters'] / 1e6:.1f}M params) on {report['device']}, "
        f"{report['dtype']}, prompt {report['prompt_len']}, gen {report['gen_len']}, torch {report['torch']}",
        f"{'batch':>5} | {'prefill tok/s':>13} {'hf':>10} {'x':>6} | {'decode tok/s':>12} {'hf':>10} {'x':>6} | match",
    ]
    for r in report["results"]:
        e, h, x = r["engine"], r["hf"] or {}, r["ratio"] or {}
        ratio_p = f"{x['prefill']:.2f}" if x else "-"
        ratio_d = f"{x['decode']:.2f}" if x else "-"
        match = "-" if r["greedy_match"] is None else f"{r['greedy_match']:.2f}"
        lines.append(
            f"{r['batch_size']:>5} | {_fmt(e['prefill_tok_s']):>13} {_fmt(h.get('prefill_tok_s')):>10} {ratio_p:>6} | "
            f"{_fmt(e['decode_tok_s']):>12} {_fmt(h.get('decode_tok_s')):>10} {ratio_d:>6} | {match}"
        )
    return "\n".join(lines)


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
