"""Prefill of one prompt through a Mamba-1 or Mamba-2 checkpoint on the CPU, arms alternated in one
process (a busy, shared machine slows all alike), the same model and prompt:

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_prefill_mamba.py --model DIR [--tokens 2048]
        [--rounds 2] [--threads 2] [--arms torch cpu gemm] [--profile ARM]

``DIR`` is an HF-format Mamba or Mamba-2 folder (``rnnserve bench llamacpp --random-shape mamba-130m``
or ``mamba2-130m`` makes one). Arms:

- ``torch``: the prefill before the C++ kernels. Mamba-1: the torch chunk kernels (conv and scan of
  ``chunk.py``); Mamba-2: the chunked torch SSD scan (``linear_recurrence/chunk.py``) and torch's Δ and
  norms. Torch's GEMMs (MKL) for the projections.
- ``cpu``: the C++ kernels (Mamba-1: conv and scan of ``cpu.py``; Mamba-2: ``linear_recurrence/cpu.cpp``'s
  SSD scan, Δ, D skip + gated norm, residual + norm) with torch's GEMMs.
- ``gemm``: ``cpu`` with the projections through the prefill GEMM of ``prefill_linear/cpu.cpp`` (Mamba-1:
  the rms norm inside in_proj's, the residual add inside out_proj's): what the model runs by default.

Each arm prefills from zeroed states and returns the last token's logits, as the engine's prefill step
does. Prints per round and arm the wall time, the process CPU time (which a loaded machine inflates
less than the wall time) and tokens/s, min / median per arm, then each arm's largest logit difference
from the first arm timed. ``--profile ARM`` also prints torch.profiler's table of one more prefill
through that arm.
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
from rnnserve.kernels.linear_recurrence import cpu as ssd_cpu
from rnnserve.kernels.prefill_linear import cpu as gemm_cpu
from rnnserve.kernels.selective_scan import chunk as scan_chunk
from rnnserve.kernels.selective_scan import cpu as scan_cpu
from rnnserve.models.base import PrefillBatch, RecurrentLM, States
from rnnserve.models.loader import load_model
from rnnserve.models.mamba import MambaLM
from rnnserve.models.mamba2 import Mamba2LM

ARMS = ("torch", "cpu", "gemm")

_SSD_READY = ssd_cpu.ready


def use_arm(model: RecurrentLM, arm: str) -> None:
    """Point every mixer's prefill kernels and projections at the arm's. Mamba-2's ``torch`` arm has the
    SSD extension report itself not ready, so its scan, Δ and norms take their torch forms."""
    ssd_cpu.ready = (lambda: None) if arm == "torch" else _SSD_READY
    for layer in model.backbone.layers:
        mixer = layer.mixer
        if isinstance(model, MambaLM):
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
    p.add_argument("--model", required=True, help="HF-format Mamba-1 or Mamba-2 folder")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="the arms timed (default all)")
    p.add_argument("--profile", choices=ARMS, help="print torch.profiler's table for one prefill of this arm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(model=args.model, dtype="float32", device="cpu", kernels="torch")).model
    if not isinstance(model, MambaLM | Mamba2LM):
        raise SystemExit(f"{args.model} is neither a Mamba nor a Mamba-2 checkpoint")
    kernels = (scan_cpu, conv_cpu) if isinstance(model, MambaLM) else (ssd_cpu,)
    if any(k.load() is None for k in (*kernels, gemm_cpu)):
        raise SystemExit("the CPU prefill kernels did not build, or this CPU lacks AVX-512 (see the warning)")
    states = [{s.name: torch.zeros((2, *s.shape), dtype=s.dtype) for s in layer} for layer in model.state_specs()]
    n = args.tokens
    arms = [a for a in ARMS if a in args.arms]
    for arm in arms:  # untimed warm-up of each arm
        use_arm(model, arm)
        prefill(model, states, min(n, 256))
    print(f"{n} tokens, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    logits: dict[str, torch.Tensor] = {}
    walls: dict[str, list[float]] = {arm: [] for arm in arms}
    cpus: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            use_arm(model, arm)
            wall, cpu, logits[arm] = prefill(model, states, n)
            walls[arm].append(wall)
            cpus[arm].append(cpu)
            print(f"round {r + 1} {arm:5s}: {wall:7.2f} s wall {cpu:7.2f} s CPU {n / wall:8.1f} tok/s", flush=True)
    for arm in arms:
        w, c = walls[arm], cpus[arm]
        print(
            f"{arm:5s}: wall min {min(w):.3f} median {statistics.median(w):.3f} s "
            f"({n / min(w):.1f} / {n / statistics.median(w):.1f} tok/s), "
            f"CPU min {min(c):.3f} median {statistics.median(c):.3f} s"
        )
    ref = logits[arms[0]]
    for arm in arms[1:]:
        diff = (logits[arm] - ref).abs().max().item()
        same = bool(torch.equal(ref.argmax(-1), logits[arm].argmax(-1)))
        print(f"{arm} vs {arms[0]}: largest |logit difference| {diff:.2e} (largest |logit| "
              f"{ref.abs().max().item():.1f}), argmax equal: {same}")  # fmt: skip
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        use_arm(model, args.profile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill(model, states, n)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
