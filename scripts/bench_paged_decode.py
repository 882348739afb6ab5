"""Decode step of a random LLaMA on the paged KV cache (CPU, fp32): the attention kernels gathering keys
and values into fresh tensors (as before) against the reused host buffers (as now), interleaved in one
process so a shared machine slows both alike; also the minor page faults per step of each.

    .venv/bin/python scripts/bench_paged_decode.py                      # compare's `small` LLaMA
    .venv/bin/python scripts/bench_paged_decode.py --hidden 768 --layers 12 --heads 12 --intermediate 2048
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import transformers

import rnnserve.kernels.paged_attention.decode as decode_kernel
from rnnserve.config import KVCacheConfig
from rnnserve.engine.kv_cache import KVCache
from rnnserve.kernels.paged_attention.cache import gather_padded
from rnnserve.models.base import DecodeBatch
from rnnserve.models.transformer import TransformerLM


def fresh_gather(
    cache: torch.Tensor, block_tables: torch.Tensor, length: int, reuse: str | None = None
) -> torch.Tensor:
    return gather_padded(cache, block_tables, length)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--points", default="1024x4,8192x1,8192x4,8192x16", help="CONTEXTxBATCH,...")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = transformers.LlamaConfig(
        vocab_size=50280,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=True,
    )
    model = TransformerLM.from_hf_config(cfg.to_dict(), backend="torch").eval()
    model.post_load()
    arms = {"fresh": fresh_gather, "reused": gather_padded}
    for point in args.points.split(","):
        ctx, batch_size = (int(x) for x in point.split("x"))
        kv = KVCache(model.kv_specs(), KVCacheConfig(), batch_size + 1, ctx + args.steps + 16, "cpu")
        slots = list(range(1, batch_size + 1))
        times: dict[str, list[float]] = {a: [] for a in arms}
        faults: dict[str, list[int]] = {a: [] for a in arms}
        for step in range(args.steps):
            for name, gather in arms.items():
                decode_kernel.gather_padded = gather
                for s in slots:
                    kv.allocate(s, ctx + step + 1)
                batch = DecodeBatch(
                    input_ids=torch.full((batch_size,), 5),
                    positions=torch.full((batch_size,), ctx + step),
                    slot_ids=torch.tensor(slots),
                    kv=kv.metadata(slots, [ctx + step + 1] * batch_size, [1] * batch_size),
                )
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                model.decode(batch, [])
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        decode_kernel.gather_padded = gather_padded
        med = {a: statistics.median(v[2:]) * 1e3 for a, v in times.items()}
        flt = {a: statistics.median(v[2:]) for a, v in faults.items()}
        print(
            f"{ctx} tokens x {batch_size}: fresh {med['fresh']:.1f} ms ({flt['fresh']:.0f} page faults), "
            f"reused {med['reused']:.1f} ms ({flt['reused']:.0f}), {med['fresh'] / med['reused']:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
