"""Prefill of one prompt through a Mamba-1 checkpoint on the CPU, arms alternated in one process (a busy,
shared machine slows all alike), the same model and prompt: ``torch`` the torch chunk kernels (conv and
scan of ``chunk.py``) and torch's GEMMs; ``cpu`` the C++ conv and scan (``cpu.py``) and torch's GEMMs;
``gemm`` those and the prefill GEMM of ``prefill_linear/cpu.cpp`` (the rms norm inside in_proj's, the
residual add inside out_proj's), what the model runs by default:

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_prefill_mamba.py --model DIR [--tokens 2048]
        [--rounds 2] [--threads 2] [--arms torch cpu gemm]

``DIR`` is an HF-format Mamba folder (``rnnserve bench llamacpp --random-shape mamba-130m`` makes one).
Each arm prefills from zeroed states and returns the last token's logits, as the engine's prefill step
does. Prints per round and arm the wall time, the process CPU time (which a loaded machine inflates
less than the wall time) and tokens/s, then each arm's largest logit difference from the first arm
timed, and min / median tokens/s per arm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rnnserve.config import ModelConfig
from rnnserve.kernels.causal_conv1d import chunk as conv_chunk
from rnnserve.kernels.causal_conv1d import cpu as conv_cpu
from rnnserve.kernels.prefill_linear import cpu as gemm_cpu
from rnnserve.kernels.selective_scan import chunk as scan_chunk
from rnnserve.kernels.selective_scan import cpu as scan_cpu
from rnnserve.models.base import PrefillBatch, RecurrentLM, States
from rnnserve.models.loader import load_model

ARMS = ("torch", "cpu", "gemm")


def use_arm(model: RecurrentLM, arm: str) -> None:
    """Point every mixer's prefill conv, scan and projections at the arm's kernels."""
    for layer in model.backbone.layers:
        mixer = layer.mixer
        if arm == "torch":
            mixer.conv_chunk, mixer.scan_chunk = conv_chunk.causal_conv1d_varlen, scan_chunk.selective_scan_varlen
        else:
            mixer.conv_chunk, mixer.scan_chunk = conv_cpu.causal_conv1d_varlen, scan_cpu.selective_scan_varlen
        mixer.prefill_linear = gemm_cpu.linear_prefill if arm == "gemm" else None


def prompt_batch(n: int, vocab: int) -> PrefillBatch:
    ids = torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(0))
    return PrefillBatch(
        input_ids=ids,
        positions=torch.arange(n),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
        slot_ids=torch.tensor([1]),
        logits_indices=torch.tensor([n - 1]),
        cu_seqlens_cpu=(0, n),
    )


def prefill(model: RecurrentLM, states: States, n: int) -> tuple[float, float, torch.Tensor]:
    """(wall s, CPU s, logits [1, V]) of one prefill of n tokens from zeroed states."""
    for layer in states:
        for t in layer.values():
            t.zero_()
    batch = prompt_batch(n, model.vocab_size)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = model.prefill(batch, states)
    return time.perf_counter() - t0, time.process_time() - c0, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format Mamba-1 folder")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="the arms timed (default all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(model=args.model, dtype="float32", device="cpu", kernels="torch")).model
    if scan_cpu.load() is None or conv_cpu.load() is None or gemm_cpu.load() is None:
        raise SystemExit("the CPU prefill kernels did not build (see the warning)")
    states = [{s.name: torch.zeros((2, *s.shape), dtype=s.dtype) for s in layer} for layer in model.state_specs()]
    n = args.tokens
    logits: dict[str, torch.Tensor] = {}
    for arm in ARMS:  # untimed warm-up of each arm
        use_arm(model, arm)
        prefill(model, states, min(n, 64))
    print(f"{n} tokens, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    arms = [a for a in ARMS if a in args.arms]
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            use_arm(model, arm)
            wall, cpu, logits[arm] = prefill(model, states, n)
            rates[arm].append(n / wall)
            print(f"round {r + 1} {arm:5s}: {wall:7.2f} s wall {cpu:7.2f} s CPU {n / wall:8.1f} tok/s", flush=True)
    ref = arms[0]
    top = logits[ref].abs().max().item()
    for arm in arms[1:]:
        diff = (logits[ref] - logits[arm]).abs().max().item()
        same = bool(torch.equal(logits[ref].argmax(-1), logits[arm].argmax(-1)))
        print(f"{arm} vs {ref}: largest |logit difference| {diff:.2e} (largest |logit| {top:.1f}), same argmax: {same}")
    for arm in arms:
        print(f"{arm:5s}: tok/s min {min(rates[arm]):.1f} median {statistics.median(rates[arm]):.1f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
