"""Decode step of every recurrent family at ~130M shapes, torch path and ``--cpu-decode fused`` where a
family has it, all arms interleaved in one process (a busy, shared machine slows every arm alike), as
tokens/s and tokens/s per parameter (relative to Mamba's fused path at the same batch size):

    .venv/bin/python scripts/bench_decode_families.py [--families mamba,rwkv7,retnet] [--batch-sizes 1,8,32]
        [--repeats 5] [--threads 2] [--work-dir /tmp/rnnserve-bench-families] [--no-torch | --no-fused]
        [--int8] [--fused-baseline REV] [--profile FAMILY:BATCH]

Mamba is mamba-130m's shape saved by ``rnnserve bench llamacpp``'s random checkpoint (made once in
``--work-dir``); the others are built from their config classes at their ~130M shapes (RWKV-7 0.1B:
768 x 12, heads of 64, vocab 65536; RetNet: fla's defaults at 768 x 12, vocab 32000; RWKV-4 169M;
DenseRetNet: the released 350M's proportions at 768 x 24, query/key 384, 2 heads, m = 1)
with random weights, which change what is generated, not how long a step takes. Parameters are every
distinct weight (embedding included). ``--int8`` adds each family's fused step with int8 weights
(Mamba: ``--quantization int8``'s layers; the others: every ``nn.Linear``; per parameter against the
same fp32 Mamba fused reference). ``--fused-baseline REV`` adds, for every family but Mamba / Mamba-2,
the fused step of ``rwkv_retnet.cpp`` and its driver ``engine/cpu_decode_families.py`` as of git
revision REV (built under another op namespace) to the same interleaved loop: before/after in one run.
``--profile`` prints the torch profiler's op table of one family's torch decode step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnserve.bench.llamacpp import create_random_model
from rnnserve.config import ModelConfig
from rnnserve.engine.cpu_decode import fused_decoder
from rnnserve.kernels.cpu_decode import build_extension
from rnnserve.models.base import DecodeBatch, RecurrentLM, States
from rnnserve.models.dense_retnet import DenseRetNetConfig, DenseRetNetLM
from rnnserve.models.layers import quantize_int8
from rnnserve.models.loader import load_model
from rnnserve.models.retnet import RetNetConfig, RetNetLM
from rnnserve.models.rwkv4 import Rwkv4Config, Rwkv4LM
from rnnserve.models.rwkv7 import Rwkv7Config, Rwkv7LM


def alloc_states(model: RecurrentLM, num_slots: int) -> States:
    return [
        {s.name: torch.full((num_slots, *s.shape), s.fill, dtype=s.dtype) for s in layer}
        for layer in model.state_specs()
    ]


@torch.no_grad()
def randomize(model: RecurrentLM, seed: int = 0) -> RecurrentLM:
    """Random weights at scales that keep the activations bounded: matrices N(0, 1/fan_in), vectors
    (lerp weights, norm scales, decay biases) U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        else:
            p.copy_(torch.rand(p.shape, generator=gen))
    model.post_load()
    return model.eval()


def build(family: str, work_dir: Path) -> RecurrentLM:
    if family in ("mamba", "mamba2"):
        shape = "mamba-130m" if family == "mamba" else "mamba2-130m"
        folder = create_random_model(shape, work_dir / shape)
        return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    if family == "rwkv7":
        cfg7 = Rwkv7Config(
            vocab_size=65536,
            hidden_size=768,
            num_layers=12,
            head_dim=64,
            decay_low_rank_dim=64,
            a_low_rank_dim=64,
            v_low_rank_dim=32,
            gate_low_rank_dim=128,
            intermediate_size=3072,
        )
        return randomize(Rwkv7LM(cfg7))
    if family == "retnet":
        return randomize(RetNetLM(RetNetConfig.from_hf({"hidden_size": 768, "num_hidden_layers": 12})))
    if family == "rwkv4":
        cfg4 = Rwkv4Config(
            vocab_size=50277, hidden_size=768, attention_hidden_size=768, intermediate_size=3072, num_layers=12
        )
        return randomize(Rwkv4LM(cfg4))
    if family == "dense_retnet":
        cfgd = DenseRetNetConfig(
            vocab_size=32000,
            hidden_size=768,
            query_key_dim=384,
            value_dim=1536,
            num_heads=2,
            num_layers=24,
            dense_block_layers=1,
        )
        return randomize(DenseRetNetLM(cfgd))
    raise SystemExit(f"unknown family {family!r}")


def int8_copy(family: str, model: RecurrentLM) -> RecurrentLM:
    """A copy with int8 weights: Mamba / Mamba-2 through their ``quantize_int8`` (in / out projections and
    head), the others with every ``nn.Linear`` swapped for its ``Int8Linear``."""
    q = copy.deepcopy(model)
    if family in ("mamba", "mamba2"):
        q.quantize_int8()
        return q
    for module in list(q.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, quantize_int8(child))
    return q


def baseline(rev: str) -> tuple[Any, Any]:
    """``rwkv_retnet.cpp`` and ``engine/cpu_decode_families.py`` as of git revision ``rev``: the op
    namespace ``torch.ops.rnnserve_cpu_rnn_baseline`` (built once) and the driver module, whose
    ``make_decoder(model, states, ops)`` builds that revision's decoders on those ops."""

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout

    folder = Path(tempfile.mkdtemp(prefix="rnnserve-baseline-"))
    src = show("rnnserve/kernels/cpu_decode/rwkv_retnet.cpp")
    for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_IMPL"):
        src = src.replace(f"{macro}(rnnserve_cpu_rnn,", f"{macro}(rnnserve_cpu_rnn_baseline,")
    (folder / "rwkv_retnet_baseline.cpp").write_text(src)
    with contextlib.suppress(subprocess.CalledProcessError):  # the revision's panels.h, where it has one
        (folder / "panels.h").write_text(show("rnnserve/kernels/cpu_decode/panels.h"))
    rev_id = subprocess.run(["git", "rev-parse", "--short", rev], check=True, capture_output=True, text=True)
    name = f"rnnserve_cpu_rnn_baseline_{rev_id.stdout.strip()}"
    ops = build_extension(name, folder / "rwkv_retnet_baseline.cpp", ["-O3", "-mavx2", "-mfma"],
                          "rnnserve_cpu_rnn_baseline", f"fused decode at {rev}")  # fmt: skip
    assert ops is not None, f"the baseline at {rev} did not build (see the log)"
    driver = folder / "cpu_decode_families_baseline.py"
    driver.write_text(show("rnnserve/engine/cpu_decode_families.py"))
    spec = importlib.util.spec_from_file_location("cpu_decode_families_baseline", driver)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ops, module


def num_params(model: RecurrentLM) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def weights_read(model: RecurrentLM) -> int:
    """Weights a decode step multiplies by per token: every parameter but an untied input embedding
    (of which a step reads only its tokens' rows)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    unread = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding) and id(m.weight) not in linear
    )
    return num_params(model) - unread


def interleaved(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """ms per call of each arm, the arms called in turn ``repeats`` times after one warm-up call each."""
    for f in arms.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for k, f in arms.items():
            t = time.perf_counter()
            f()
            times[k].append(1000 * (time.perf_counter() - t))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="mamba,rwkv7,retnet")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/rnnserve-bench-families"))
    p.add_argument("--no-fused", action="store_true", help="torch path only")
    p.add_argument("--no-torch", action="store_true", help="fused arms only (more repeats in the same time)")
    p.add_argument("--int8", action="store_true", help="also each family's fused step with int8 weights")
    p.add_argument("--fused-baseline", default=None, metavar="REV", help="also the RWKV / RetNet fused step at REV")
    p.add_argument("--profile", default=None, help="FAMILY:BATCH: the torch profiler's table of that torch step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    families = args.families.split(",")
    models = {f: build(f, args.work_dir) for f in families}
    params = {f: num_params(m) for f, m in models.items()}
    read = {f: weights_read(m) for f, m in models.items()}
    for f in families:
        print(f"{f}: {params[f] / 1e6:.1f}M parameters, {read[f] / 1e6:.1f}M read per token", flush=True)
    int8 = {f: int8_copy(f, m) for f, m in models.items()} if args.int8 and not args.no_fused else {}
    base = baseline(args.fused_baseline) if args.fused_baseline and not args.no_fused else None

    with torch.inference_mode():
        if args.profile:
            fam, b = args.profile.split(":")
            model, b = models[fam], int(b)
            batch = DecodeBatch(torch.randint(10, 1000, (b,)), torch.full((b,), 7), torch.arange(1, b + 1))
            states = alloc_states(model, b + 1)
            model.decode(batch, states)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    model.decode(batch, states)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            return
        for b in (int(x) for x in args.batch_sizes.split(",")):
            batch = DecodeBatch(torch.randint(10, 1000, (b,)), torch.full((b,), 7), torch.arange(1, b + 1))
            arms: dict[str, Callable[[], object]] = {}
            for f, m in models.items():
                states = alloc_states(m, b + 1)
                if not args.no_torch:
                    arms[f"{f} torch"] = lambda m=m, s=states, x=batch: m.decode(x, s)
                fused = None if args.no_fused else fused_decoder(m, alloc_states(m, b + 1))
                if fused is not None:
                    arms[f"{f} fused"] = lambda fz=fused, x=batch: fz(x)
                if base is not None and f not in ("mamba", "mamba2"):
                    old = base[1].make_decoder(m, alloc_states(m, b + 1), base[0])
                    arms[f"{f} fused@{args.fused_baseline}"] = lambda fz=old, x=batch: fz(x)
                fused8 = fused_decoder(int8[f], alloc_states(m, b + 1)) if f in int8 else None
                if fused8 is not None:
                    arms[f"{f} fused-int8"] = lambda fz=fused8, x=batch: fz(x)
            times = interleaved(arms, args.repeats)
            meds = {k: statistics.median(v) for k, v in times.items()}
            ref_tps = 1000 * b / meds["mamba fused"] if "mamba fused" in meds else None
            for k, v in times.items():
                tps, f = 1000 * b / meds[k], k.split()[0]
                rel = ""
                if ref_tps:  # tok/s ÷ parameters (and ÷ weights read), relative to Mamba's fused step
                    per_param = (tps / params[f]) / (ref_tps / params["mamba"])
                    per_read = (tps / read[f]) / (ref_tps / read["mamba"])
                    rel = f", {per_param:.2f}x mamba fused per parameter ({per_read:.2f}x per weight read)"
                print(f"batch {b} {k}: {meds[k]:.1f} ms ({min(v):.1f}-{max(v):.1f}), {tps:.1f} tok/s{rel}", flush=True)


if __name__ == "__main__":
    main()
