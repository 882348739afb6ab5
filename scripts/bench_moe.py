"""The MoE feed-forward's CPU path on one layer of a Jamba-shaped MoE, arms interleaved in one process
(so a busy, shared machine slows every arm alike):

    .venv/bin/python scripts/bench_moe.py [--hidden 1024] [--inter 3584] [--experts 16] [--top-k 2]
        [--tokens 1,8,64,512] [--repeats 5] [--threads 1]

The default shape is Jamba-v0.1's (hidden 4096, expert width 14336, 16 experts, top-2) with both
widths divided by 4, so the expert weights (E · 3 · I · D fp32, 705 MB) fit a small machine. Arms, all
with Jamba's router (top-k of the softmax over all experts):

- ``models/moe.grouped_experts`` (one sort, each expert once on all of its tokens), the expert
  weights stored row-major (as loaded) and column-major (``JambaMoE.use_column_major_experts``, what
  JambaLM does on the CPU);
- transformers' eager expert loop (the same grouping through a one-hot mask);
- a loop over tokens (up to 64 tokens);
- the same FLOPs without routing (all N·k rows through one expert's two matrix products): a floor
  for many tokens, none for a few (it reads one expert's weights, not every expert hit).

Prints the median ms per call with the range, and for the column-major grouped arm the bytes of
expert weights it reads per second and its GFLOP/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rnnserve.models.moe import grouped_experts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3584)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", default="1,8,64,512")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d, inter, num_experts, k = args.hidden, args.inter, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    router = torch.randn(num_experts, d, generator=g) / d**0.5  # [E, D]
    w_in = torch.randn(num_experts, 2 * inter, d, generator=g) / d**0.5  # [E, 2I, D] gate rows, then up rows
    w_out = torch.randn(num_experts, d, inter, generator=g) / inter**0.5  # [E, D, I]
    # The same values, each expert's matrix stored column-major.
    w_in_cm, w_out_cm = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w_in, w_out))

    def route(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = torch.softmax(F.linear(x, router).float(), dim=-1).topk(k, dim=-1)  # [N, k]
        return weights.to(x.dtype), experts

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(xs, w_in[e]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, w_out[e])

    def grouped(x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(x)
        return grouped_experts(x, experts, weights, num_experts, expert)

    def expert_cm(e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(xs, w_in_cm[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_out_cm[e])

    def grouped_column_major(x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(x)
        return grouped_experts(x, experts, weights, num_experts, expert_cm)

    def floor(x: torch.Tensor) -> torch.Tensor:  # the same FLOPs, one expert, no routing
        return expert(0, x.repeat(k, 1))

    def transformers_eager(x: torch.Tensor) -> torch.Tensor:  # JambaExperts.forward, "eager"
        weights, experts = route(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(experts, num_classes=num_experts).permute(2, 1, 0)  # [E, k, N]
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, expert(e, x[tok]) * weights[tok, slot, None])
        return out

    def per_token(x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(x)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(k):
                out[t] += weights[t, j] * expert(int(experts[t, j]), x[t : t + 1])[0]
        return out

    print(f"MoE D {d}, I {inter}, {num_experts} experts, top-{k}, fp32, {args.threads} thread(s)")
    for n in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(n, d, generator=g)
        arms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "grouped": grouped,
            "grouped, column-major": grouped_column_major,
            "transformers eager": transformers_eager,
        }
        if n <= 64:
            arms["per-token loop"] = per_token
        expect = grouped(x)
        for name, f in arms.items():  # warm-up and a check that the arms agree
            torch.testing.assert_close(f(x), expect, atol=1e-4, rtol=1e-4, msg=lambda m, a=name: f"{a}: {m}")
        arms["floor (no routing)"] = floor
        floor(x)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, f in arms.items():
                t = time.perf_counter()
                f(x)
                times[name].append((time.perf_counter() - t) * 1e3)
        hit = int(route(x)[1].unique().numel())
        cells = [f"N {n:4d} ({hit:2d} experts hit)"]
        for name, ms in times.items():
            cells.append(f"{name} {statistics.median(ms):8.2f} ms [{min(ms):.1f}-{max(ms):.1f}]")
        ms = statistics.median(times["grouped, column-major"])
        weight_bytes = hit * 3 * inter * d * 4
        flops = n * k * 3 * 2 * inter * d
        cells.append(
            f"grouped, column-major: {weight_bytes / ms / 1e6:.1f} GB/s of weights, {flops / ms / 1e6:.1f} GFLOP/s"
        )
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
