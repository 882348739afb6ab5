"""Decode step of the LLaMA Transformer baseline at ~124M parameters (``rnnserve bench compare``'s 130m
preset: hidden 768, 12 layers, 12 heads of 64, gated MLP 2048, NeoX vocabulary, tied head; random
weights), torch path against ``--cpu-decode fused``, arms alternated step by step in one process (a
busy, shared machine slows every arm alike):

    .venv/bin/python scripts/bench_decode_transformer.py [--batch-sizes 1,8,32] [--prompt-len 128]
        [--steps 32] [--threads 2] [--int8] [--no-torch] [--mamba] [--work-dir /tmp/rnnserve-bench-llama]

Each batch size: B sequences of ``--prompt-len`` tokens prefilled (torch path) into one paged KV cache
per arm (the same keys and values), then ``--steps`` decode steps in which every arm appends one token
per sequence to its own cache, so all arms attend over the same lengths. Prints tokens/s (B / step
time: median and range over the steps) per arm and the fused / torch ratio. ``--int8`` adds the torch
and fused arms of ``--quantization int8``; ``--no-torch`` leaves the torch arms out; ``--mamba`` adds
the fused step of the preset's Mamba-130m (same script's random checkpoint, the same alternation), to
compare the two fused steps per weight read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rnnserve.bench.compare import PRESETS, create_models
from rnnserve.config import KVCacheConfig, ModelConfig
from rnnserve.engine.cpu_decode import fused_decoder
from rnnserve.engine.kv_cache import KVCache
from rnnserve.models.base import DecodeBatch, PrefillBatch, RecurrentLM
from rnnserve.models.loader import load_model

VOCAB_IDS = 50000  # token ids drawn below this (the NeoX vocabulary has 50280)


class Arm:
    """One decode path over its own KV cache."""

    def __init__(
        self, name: str, model: RecurrentLM, step: Callable[[DecodeBatch], torch.Tensor], cache: KVCache | None
    ) -> None:
        self.name, self.model, self.step, self.cache = name, model, step, cache
        self.times: list[float] = []


def _cache(model: RecurrentLM, batch: int, max_len: int) -> KVCache:
    return KVCache(model.kv_specs(), KVCacheConfig(), batch + 1, max_len, "cpu")


@torch.inference_mode()
def _prefill(model: RecurrentLM, cache: KVCache, prompts: list[list[int]]) -> None:
    slots = list(range(1, len(prompts) + 1))
    n = len(prompts[0])
    for s in slots:
        assert cache.allocate(s, n)
    cu = [i * n for i in range(len(prompts) + 1)]
    batch = PrefillBatch(
        input_ids=torch.tensor([t for p in prompts for t in p]),
        positions=torch.arange(n).repeat(len(prompts)),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        slot_ids=torch.tensor(slots),
        logits_indices=torch.tensor(cu[1:]) - 1,
        cu_seqlens_cpu=tuple(cu),
        kv=cache.metadata(slots, [n] * len(prompts), [n] * len(prompts)),
    )
    model.prefill(batch, [])


def _decode_batch(cache: KVCache, tokens: list[int], length: int) -> DecodeBatch:
    slots = list(range(1, len(tokens) + 1))
    for s in slots:
        assert cache.allocate(s, length + 1)
    return DecodeBatch(
        input_ids=torch.tensor(tokens),
        positions=torch.full((len(tokens),), length, dtype=torch.long),
        slot_ids=torch.tensor(slots),
        kv=cache.metadata(slots, [length + 1] * len(tokens), [1] * len(tokens)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--int8", action="store_true", help="add --quantization int8's torch and fused arms")
    p.add_argument("--no-torch", action="store_true", help="fused arms only")
    p.add_argument("--mamba", action="store_true", help="add Mamba-130m's fused step")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/rnnserve-bench-llama"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    mamba_dir, llama_dir, counts = create_models(PRESETS["130m"], args.work_dir)
    cfgs = {"fp32": ModelConfig(model=str(llama_dir), dtype="float32", device="cpu")}
    if args.int8:
        cfgs["int8"] = ModelConfig(model=str(llama_dir), dtype="float32", device="cpu", quantization="int8")
    models = {name: load_model(c).model for name, c in cfgs.items()}
    decoders = {name: fused_decoder(m, []) for name, m in models.items()}
    assert all(d is not None for d in decoders.values()), "the fused decode is unavailable"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"LLaMA {counts['llama'] / 1e6:.0f}M params, prompt {args.prompt_len}, {args.steps} steps, "
        f"{args.threads} threads; load average {load}"
    )
    mamba = load_model(ModelConfig(model=str(mamba_dir), dtype="float32", device="cpu")).model if args.mamba else None
    gen = torch.Generator().manual_seed(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(0, VOCAB_IDS, (batch, args.prompt_len), generator=gen).tolist()
        max_len = args.prompt_len + args.steps + 2
        arms: list[Arm] = []
        for name, model in models.items():
            for path in ("fused",) if args.no_torch else ("torch", "fused"):
                cache = _cache(model, batch, max_len)
                _prefill(model, cache, prompts)
                step = model.decode if path == "torch" else decoders[name]
                step_fn = (lambda b, step=step: step(b, [])) if path == "torch" else step
                arms.append(Arm(f"{name} {path}", model, step_fn, cache))
        if mamba is not None:
            states = [
                {s.name: torch.full((batch + 1, *s.shape), s.fill, dtype=s.dtype) for s in layer}
                for layer in mamba.state_specs()
            ]
            mamba_step = fused_decoder(mamba, states)
            assert mamba_step is not None, "the fused Mamba decode is unavailable"
            arms.append(Arm("mamba fused", mamba, mamba_step, None))
        tokens = torch.randint(0, VOCAB_IDS, (args.steps + 1, batch), generator=gen).tolist()
        slots = torch.arange(1, batch + 1)  # the Mamba arm's state slots
        with torch.inference_mode():
            for i in range(args.steps + 1):
                order = arms if i % 2 == 0 else arms[::-1]  # alternate which arm goes first
                for arm in order:
                    b = (
                        _decode_batch(arm.cache, tokens[i], args.prompt_len + i)
                        if arm.cache is not None
                        else DecodeBatch(torch.tensor(tokens[i]), torch.zeros(batch, dtype=torch.long), slots)
                    )
                    t0 = time.perf_counter()
                    arm.step(b)
                    if i:  # step 0 warms up
                        arm.times.append(time.perf_counter() - t0)
        med = {arm.name: batch / statistics.median(arm.times) for arm in arms}
        for arm in arms:
            lo, hi = batch / max(arm.times), batch / min(arm.times)
            print(f"batch {batch:3d}  {arm.name:11s}  {med[arm.name]:8.1f} tok/s  (steps {lo:.1f}-{hi:.1f})")
        for name in models if not args.no_torch else ():
            print(f"batch {batch:3d}  {name} fused / torch: {med[f'{name} fused'] / med[f'{name} torch']:.2f}x")


if __name__ == "__main__":
    main()
