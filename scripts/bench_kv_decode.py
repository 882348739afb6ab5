"""Decode tokens/s of the `bench compare` random pair at long context, without the prefill: the Bamba-shaped
hybrid against the LLaMA baseline on the paged KV cache, B sequences that each already hold CONTEXT tokens.

Issue 12's target point (8k context, 16 in flight, the ~130M pair) takes hours to prefill through two
servers on a 2-core CPU. A decode step's cost does not depend on the values in the KV blocks or in the
recurrent states, only on their sizes (how many blocks each sequence's attention reads, the fixed-size
state update), so this script fills them with random values instead of prefilling: it builds both models
from compare.py's presets (``create_models``, ``baseline_for_context``; loaded by the server's loader),
sets up the state pool, the paged KV cache and the decoder the runner picks for a model with attention
layers (eager), allocates CONTEXT tokens of blocks per sequence, fills every KV block and state with
random values, and times decode steps of the whole batch (each step one more token per sequence, as in
serving), the two models and the torch thread counts interleaved step by step, so a shared machine
slows all alike. Prints per model and thread count the median step and the decode tok/s
(batch / median step, with the range over the steps), the hybrid / LLaMA ratio, and the bytes per
sequence (state slot + KV blocks at CONTEXT tokens).

    .venv/bin/python scripts/bench_kv_decode.py                                  # 130m, 16 x 8192, threads 2,1
    .venv/bin/python scripts/bench_kv_decode.py --size small --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rnnserve.bench.compare import HYBRID_PRESETS, PRESETS, baseline_for_context, create_models
from rnnserve.config import KVCacheConfig, ModelConfig, StatePoolConfig
from rnnserve.engine.cuda_graph import eager_decoder
from rnnserve.engine.kv_cache import KVCache, available_memory, cdiv
from rnnserve.engine.state_pool import StatePool
from rnnserve.models.base import DecodeBatch, RecurrentLM
from rnnserve.models.loader import load_model

# The KV caches may take at most this share of the memory available at the start (others share the host).
_MEMORY_SHARE = 0.7


class Arm:
    """One model with its state pool, paged KV cache and decoder, ``batch`` sequences at ``context`` tokens."""

    def __init__(self, name: str, model: RecurrentLM, batch: int, context: int, max_steps: int, block: int) -> None:
        self.name, self.model, self.batch = name, model, batch
        self.pool = StatePool(model.state_specs(), StatePoolConfig(max_num_seqs=batch), model.device)
        self.slots = [self.pool.alloc() for _ in range(batch)]  # type: ignore[misc]
        max_len = context + max_steps
        per_block = block * sum(s.bytes_per_token for s in model.kv_specs())
        cfg = KVCacheConfig(kv_cache_memory=batch * cdiv(max_len, block) * per_block, block_size=block)
        self.kv = KVCache(model.kv_specs(), cfg, self.pool.num_slots, max_len, model.device)
        self.length = context  # tokens every sequence holds
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for s in self.slots:
                assert self.kv.allocate(s, context)  # type: ignore[arg-type]
            for k, v in self.kv.caches:  # [num_blocks + 1, block, Hkv, D]
                k.normal_(generator=g)
                v.normal_(generator=g)
            for layer in self.pool.states:  # name -> [num_slots, *shape]
                for t in layer.values():
                    if t.is_floating_point():
                        t.normal_(generator=g).mul_(0.1)
        self.decode = eager_decoder(model, self.pool.states)
        self.times: dict[int, list[float]] = {}
        kv_bytes = self.kv.blocks_for(context) * self.kv.bytes_per_block
        self.bytes_per_seq = {
            "state": self.pool.bytes_per_slot,
            "kv": kv_bytes,
            "total": self.pool.bytes_per_slot + kv_bytes,
        }

    def step(self, threads: int, record: bool) -> None:
        """One decode step: every sequence appends its token at position ``length``."""
        for s in self.slots:
            assert self.kv.allocate(s, self.length + 1)  # type: ignore[arg-type]
        batch = DecodeBatch(
            input_ids=torch.full((self.batch,), 5, dtype=torch.long),
            positions=torch.full((self.batch,), self.length, dtype=torch.long),
            slot_ids=torch.tensor(self.slots, dtype=torch.long),
            kv=self.kv.metadata(self.slots, [self.length + 1] * self.batch, [1] * self.batch),  # type: ignore[arg-type]
        )
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.decode(batch)
            dt = time.perf_counter() - t0
        self.length += 1
        if record:
            self.times.setdefault(threads, []).append(dt)


def kv_bytes_needed(model: RecurrentLM, batch: int, tokens: int, block: int) -> int:
    per_block = block * sum(s.bytes_per_token for s in model.kv_specs())
    return batch * cdiv(tokens, block) * per_block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(HYBRID_PRESETS), default="130m", help="compare.py's preset")
    p.add_argument("--context", type=int, default=8192, help="tokens each sequence already holds")
    p.add_argument("--batch", type=int, default=16, help="sequences decoding together")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and thread count")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", default="2,1", help="torch thread counts, comma-separated")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--models-dir", type=Path, default=None, help="where the random models go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rounds = args.warmup + args.steps
    max_steps = rounds * len(threads) + 1

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.models_dir or Path(tmp)
        rec_dir, llama_dir, params = create_models(PRESETS[args.size], folder, hybrid=HYBRID_PRESETS[args.size])
        # The baseline's RoPE / position limit sized for the context, as compare sizes it per prompt length.
        llama_dir = baseline_for_context(llama_dir, args.context + max_steps, folder)
        models = {
            name: load_model(ModelConfig(model=str(path), dtype="float32", device="cpu")).model
            for name, path in (("hybrid", rec_dir), ("llama", llama_dir))
        }

    batch, note = args.batch, None
    free = available_memory(torch.device("cpu")) or 0
    need = sum(kv_bytes_needed(m, args.batch, args.context + max_steps, args.block_size) for m in models.values())
    if free and need > _MEMORY_SHARE * free:
        per_seq = need // args.batch
        batch = max(1, int(_MEMORY_SHARE * free) // per_seq)
        note = (
            f"{args.batch} sequences need {need / 2**30:.1f} GiB of KV cache, {free / 2**30:.1f} GiB available: "
            f"ran {batch} sequences"
        )
    arms = [Arm(n, m, batch, args.context, max_steps, args.block_size) for n, m in models.items()]
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for threads_now in threads:
            torch.set_num_threads(threads_now)
            for arm in arms:  # interleaved: a busy moment on the shared host hits both models and thread counts
                arm.step(threads_now, record=r >= args.warmup)
        load.append(os.getloadavg()[0])

    result: dict = {
        "size": args.size,
        "parameters": {"hybrid": params["bamba"], "llama": params["llama"]},
        "context": args.context,
        "batch": batch,
        "note": note,
        "values": "KV blocks and recurrent states filled with random values (no prefill): decode cost does not "
        "depend on them",
        "load_average_1min": {"min": min(load), "max": max(load)},
        "bytes_per_seq": {a.name: a.bytes_per_seq for a in arms},
        "threads": {},
    }
    for t in threads:
        row: dict = {}
        for a in arms:
            ts = a.times[t]
            row[a.name] = {
                "median_step_ms": statistics.median(ts) * 1e3,
                "decode_tok_s": batch / statistics.median(ts),
                "decode_tok_s_range": [batch / max(ts), batch / min(ts)],
            }
        row["ratio"] = row["hybrid"]["decode_tok_s"] / row["llama"]["decode_tok_s"]
        result["threads"][t] = row

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.size}: hybrid {params['bamba'] / 1e6:.0f}M vs LLaMA {params['llama'] / 1e6:.0f}M, "
        f"{batch} sequences x {args.context} tokens (random KV / state values), {args.steps} steps each"
    )
    if note:
        print(f"note: {note}")
    for t, row in result["threads"].items():
        h, ll = row["hybrid"], row["llama"]
        print(
            f"threads {t}: hybrid {h['decode_tok_s']:.1f} tok/s ({h['decode_tok_s_range'][0]:.1f}-"
            f"{h['decode_tok_s_range'][1]:.1f}, step {h['median_step_ms']:.0f} ms), LLaMA {ll['decode_tok_s']:.1f} "
            f"tok/s ({ll['decode_tok_s_range'][0]:.1f}-{ll['decode_tok_s_range'][1]:.1f}, step "
            f"{ll['median_step_ms']:.0f} ms): {row['ratio']:.2f}x"
        )
    for name, b in result["bytes_per_seq"].items():
        print(
            f"{name}: {b['total'] / 2**20:.2f} MiB per sequence at {args.context} tokens "
            f"(state {b['state'] / 2**20:.2f} MiB, KV {b['kv'] / 2**20:.2f} MiB)"
        )
    print(f"load average (1 min) while measuring: {min(load):.1f}-{max(load):.1f}")


if __name__ == "__main__":
    main()
