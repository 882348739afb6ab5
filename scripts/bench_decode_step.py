"""The decode step and the mixed step of one model folder, arms interleaved in one process (so a busy,
shared machine slows every arm alike):

    .venv/bin/python scripts/bench_decode_step.py --model DIR [--batch-sizes 1,8,32] [--repeats 7] [--threads 1]

Decode arms: float32 as loaded, ``--quantization int8`` (Mamba, Mamba-2), for Mamba-2 float32 with
row-major in/out projections (the layout before they were stored column-major), and ``--cpu-decode
fused`` (the C++ decode of rnnserve/kernels/cpu_decode) of the float32 and the int8 model; ``--no-fused``
/ ``--no-int8`` / ``--no-torch`` leave those out; ``--fused-baseline REV`` adds the float32 fused step of
an earlier revision's cpu_decode.cpp (before/after in one process); with ``--baseline-header-only`` the
baseline is the working tree's cpu_decode.cpp built with REV's panels.h and runs the same packed
weights, float32 and int8, so the arms differ in the packed GEMM kernels alone.
Then one mixed step (``--mixed-decodes`` decode rows + a ``--mixed-prompt``-token chunk; ``--no-mixed``
leaves it out): ``model.mixed`` (one pass) against the interface's two-call default. Prints the median ms
per step with the range.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from rnnserve.config import ModelConfig
from rnnserve.engine.cpu_decode import fused_decoder
from rnnserve.models.base import DecodeBatch, MixedBatch, PrefillBatch, RecurrentLM, States
from rnnserve.models.loader import load_model


def alloc_states(model: RecurrentLM, num_slots: int) -> States:
    return [
        {s.name: torch.full((num_slots, *s.shape), s.fill, dtype=s.dtype) for s in layer}
        for layer in model.state_specs()
    ]


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


def show(label: str, times: dict[str, list[float]], tokens: int) -> None:
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{label} {k}: {med:.1f} ms ({min(v):.1f}-{max(v):.1f}), {1000 * tokens / med:.1f} tok/s", flush=True)


@functools.cache  # one build and load per process: a second load would register the op namespace again
def baseline_ops(rev: str, header_only: bool = False):
    """torch.ops.rnnserve_cpu_baseline: cpu_decode.cpp as of git revision ``rev`` (``header_only``: the
    working tree's cpu_decode.cpp with ``rev``'s panels.h, so the arms differ in the GEMM kernels alone),
    built once per source and header."""
    import hashlib
    import subprocess
    import tempfile
    from pathlib import Path

    from torch.utils.cpp_extension import load as build

    source = "rnnserve/kernels/cpu_decode/cpu_decode.cpp"
    if header_only:
        src = Path(source).read_text()
    else:
        src = subprocess.run(["git", "show", f"{rev}:{source}"], check=True, capture_output=True, text=True).stdout
    src = src.replace("TORCH_LIBRARY(rnnserve_cpu,", "TORCH_LIBRARY(rnnserve_cpu_baseline,")
    src = src.replace("TORCH_LIBRARY_IMPL(rnnserve_cpu,", "TORCH_LIBRARY_IMPL(rnnserve_cpu_baseline,")
    path = Path(tempfile.mkdtemp()) / "cpu_decode_baseline.cpp"
    path.write_text(src)
    # The revision's panels.h beside it, where it has one (the quoted include finds it first).
    header = subprocess.run(
        ["git", "show", f"{rev}:rnnserve/kernels/cpu_decode/panels.h"], capture_output=True, text=True
    )
    if header.returncode == 0:
        path.with_name("panels.h").write_text(header.stdout)
    # torch keys its cached build on the source and flags only: the header's hash in a define rebuilds it
    # when another revision's panels.h comes beside the same source.
    digest = hashlib.sha256(header.stdout.encode()).hexdigest()[:16]
    flags = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", f"-DRNNSERVE_BASELINE_HEADER_SHA={digest}"]
    build(name="rnnserve_cpu_decode_baseline", sources=[str(path)], extra_cflags=flags, is_python_module=False)
    return torch.ops.rnnserve_cpu_baseline


def baseline_step(
    ops, model: RecurrentLM, states: States, batch: DecodeBatch, packed: bool = False
) -> Callable[[], object]:
    """One fused step through ``ops`` (another revision's build) with the weights unpacked: [in, out]; or,
    ``packed`` (ops built from the working tree's source), with the packed weights the current step uses,
    so both arms run gemm_packed."""
    current = fused_decoder(model, states)
    assert current is not None, "the fused path does not apply to this model"
    a = dict(current.args)
    mixers = [layer.mixer for layer in model.backbone.layers]
    if packed:
        head, head_kn = current.head_w, current.head_kn
    else:
        for key, name in (("in_w", "in_proj"), ("x_w", "x_proj"), ("dt_w", "dt_proj"), ("out_w", "out_proj")):
            if key in a:
                a[key] = [getattr(m, name).weight.detach().t().contiguous() for m in mixers]
        head = model.lm_head.weight.detach()
        head_kn = not head.is_contiguous()
        head = head.t().contiguous() if head_kn else head
    pools = ([st["conv"] for st in states], [st["ssm"] for st in states])
    if "x_w" in a:  # Mamba-1
        return lambda: ops.mamba1_decode(
            batch.input_ids, batch.slot_ids, a["emb"], a["norm_w"], a["in_w"], a["in_b"], a["conv_w"], a["conv_b"],
            a["x_w"], a["dt_w"], a["dt_b"], a["A"], a["D"], a["out_w"], a["out_b"], *pools, current.norm_f, head,
            head_kn, current.eps,
        )  # fmt: skip
    return lambda: ops.mamba2_decode(
        batch.input_ids, batch.slot_ids, a["emb"], a["norm_w"], a["in_w"], a["in_b"], a["conv_w"], a["conv_b"],
        a["dt_bias"], a["A"], a["D"], a["gnorm_w"], a["out_w"], a["out_b"], *pools, current.norm_f, head, head_kn,
        current.eps, *current.dims,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mixed-decodes", type=int, default=8)
    p.add_argument("--mixed-prompt", type=int, default=64)
    p.add_argument("--no-fused", action="store_true", help="leave out the --cpu-decode fused arm")
    p.add_argument("--no-int8", action="store_true", help="leave out the int8 arm")
    p.add_argument("--no-mixed", action="store_true", help="leave out the mixed step")
    p.add_argument("--no-torch", action="store_true", help="leave out the torch-path decode arms")
    p.add_argument(
        "--fused-baseline",
        metavar="REV",
        help="also run the fp32 fused step of cpu_decode.cpp at git revision REV (built under another op "
        "namespace, weights passed unpacked as [in, out], which every revision's ops accept): before/after",
    )
    p.add_argument(
        "--baseline-header-only",
        action="store_true",
        help="the --fused-baseline arm builds the working tree's cpu_decode.cpp with REV's panels.h (the GEMM "
        "kernels' before/after alone, whatever else changed in cpu_decode.cpp)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = load_model(ModelConfig(model=args.model)).model
    models: dict[str, RecurrentLM] = {"fp32": fp32}
    try:
        if not args.no_int8:
            models["int8"] = load_model(ModelConfig(model=args.model, quantization="int8")).model
    except Exception as exc:  # a family without int8: decode arms are float32 only
        print(f"int8: {exc}")
    if hasattr(fp32, "backbone") and type(fp32).__name__ == "Mamba2LM":
        row_major = load_model(ModelConfig(model=args.model)).model
        for layer in row_major.backbone.layers:
            for linear in (layer.mixer.in_proj, layer.mixer.out_proj):
                linear.weight.data = linear.weight.data.contiguous()
        models = {"fp32 row-major": row_major, **models}

    with torch.inference_mode():
        for b in (int(x) for x in args.batch_sizes.split(",")):
            batch = DecodeBatch(torch.randint(10, 1000, (b,)), torch.zeros(b, dtype=torch.long), torch.arange(1, b + 1))
            states = {k: alloc_states(m, b + 1) for k, m in models.items()}
            arms = (
                {}
                if args.no_torch
                else {k: (lambda m=m, s=states[k], x=batch: m.decode(x, s)) for k, m in models.items()}
            )
            if args.fused_baseline:
                ops = baseline_ops(args.fused_baseline, args.baseline_header_only)
                label = "panels.h" if args.baseline_header_only else "fused"
                for name in [k for k in ("fp32", "int8") if k in models][: 2 if args.baseline_header_only else 1]:
                    arms[f"{name} {label} at {args.fused_baseline}"] = baseline_step(
                        ops, models[name], alloc_states(models[name], b + 1), batch, args.baseline_header_only
                    )
            for name in [] if args.no_fused else [k for k in ("fp32", "int8") if k in models]:
                fused = fused_decoder(models[name], alloc_states(models[name], b + 1))
                if fused is not None:
                    arms[f"{name} fused"] = lambda f=fused, x=batch: f(x)
            show(f"decode batch {b}", interleaved(arms, args.repeats), b)
        if args.no_mixed:
            return

        n, t = args.mixed_decodes, args.mixed_prompt
        states = alloc_states(fp32, n + 2)
        decode = DecodeBatch(torch.randint(10, 1000, (n,)), torch.full((n,), 5), torch.arange(1, n + 1))
        prefill = PrefillBatch(
            input_ids=torch.randint(10, 1000, (t,)),
            positions=torch.arange(t),
            cu_seqlens=torch.tensor([0, t], dtype=torch.int32),
            slot_ids=torch.tensor([n + 1]),
            logits_indices=torch.tensor([t - 1]),
            cu_seqlens_cpu=(0, t),
        )
        mixed = MixedBatch.pack(decode, prefill)
        arms = {
            "one pass": lambda: fp32.mixed(mixed, states),
            "two calls": lambda: RecurrentLM.mixed(fp32, mixed, states),
        }
        show(f"mixed step {n} decodes + {t}-token chunk", interleaved(arms, args.repeats), n + t)


if __name__ == "__main__":
    main()
