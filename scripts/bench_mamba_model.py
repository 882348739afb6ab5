"""Prefill and decode speed of our MambaLM against transformers' MambaForCausalLM, same random
weights (Mamba-130m shape by default), called directly (no engine, no server).

    .venv/bin/python scripts/bench_mamba_model.py [--prompt-len 2048] [--batch-sizes 1,8] [--json FILE]

Prints seconds per prefill, ms per decode step and tokens/s for both, with the ratio. Each figure is
the best of ``--repeats`` runs (the machine is shared: the minimum is the least disturbed run).
transformers' decode is measured through ``generate()`` (greedy, use_cache=True): the time for
prompt + n new tokens minus the time for prompt + 1 new token, divided by n - 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def alloc_states(model, num_slots: int) -> list[dict[str, torch.Tensor]]:
    return [
        {s.name: torch.full((num_slots, *s.shape), s.fill, dtype=s.dtype) for s in layer}
        for layer in model.state_specs()
    ]


def prefill_batch(seqs: list[list[int]], slots: list[int]):
    from rnnserve.models.base import PrefillBatch

    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    return PrefillBatch(
        input_ids=torch.tensor([t for s in seqs for t in s]),
        positions=torch.cat([torch.arange(n) for n in lens.tolist()]),
        cu_seqlens=cu,
        slot_ids=torch.tensor(slots),
        logits_indices=(cu[1:] - 1).long(),
        cu_seqlens_cpu=cu.tolist(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--decode-prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="measure our model only")
    p.add_argument("--skip-prefill", action="store_true", help="measure decode only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from transformers import MambaConfig, MambaForCausalLM
    from transformers.utils import logging as hf_logging

    from rnnserve.config import ModelConfig
    from rnnserve.models.base import DecodeBatch
    from rnnserve.models.loader import load_model

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab, state_size=16)
    ref = MambaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory(prefix="bench_mamba_") as folder:
        ref.save_pretrained(folder)
        model = load_model(ModelConfig(model=folder, dtype="float32", device="cpu", kernels="torch")).model
    results: dict[str, object] = {"threads": torch.get_num_threads(), "shape": vars(args)}

    prompt = torch.randint(0, args.vocab, (args.prompt_len,)).tolist()
    with torch.no_grad():
        if not args.skip_prefill:

            def ours_prefill() -> None:
                states = alloc_states(model, 2)
                model.prefill(prefill_batch([prompt], [1]), states)

            ours_prefill()  # warm-up
            t_ours = best_of(ours_prefill, args.repeats)
            results["prefill_s_ours"] = t_ours
            print(
                f"prefill {args.prompt_len} tokens: ours {t_ours:.3f} s ({args.prompt_len / t_ours:.0f} tok/s)",
                flush=True,
            )
            if not args.skip_hf:
                ids = torch.tensor([prompt])
                t_hf = best_of(lambda: ref(ids, use_cache=False, logits_to_keep=1), max(1, args.repeats - 1))
                results["prefill_s_hf"] = t_hf
                print(
                    f"prefill {args.prompt_len} tokens: transformers {t_hf:.3f} s -> ratio {t_hf / t_ours:.2f}x",
                    flush=True,
                )

        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = torch.randint(0, args.vocab, (bs, args.decode_prompt_len))
            slots = list(range(1, bs + 1))
            states = alloc_states(model, bs + 1)
            logits = model.prefill(prefill_batch(prompts.tolist(), slots), states)
            batch = DecodeBatch(
                input_ids=logits.argmax(-1),
                positions=torch.full((bs,), args.decode_prompt_len),
                slot_ids=torch.tensor(slots),
            )

            def ours_decode(batch: DecodeBatch = batch, states=states) -> None:
                for _ in range(args.steps):
                    batch.input_ids = model.decode(batch, states).argmax(-1)

            ours_decode()  # warm-up
            step_ours = best_of(ours_decode, args.repeats) / args.steps
            results[f"decode_ms_ours_b{bs}"] = step_ours * 1e3
            line = f"decode batch {bs}: ours {step_ours * 1e3:.1f} ms/step ({bs / step_ours:.0f} tok/s)"
            if not args.skip_hf:

                def gen(n: int, prompts: torch.Tensor = prompts) -> None:
                    ref.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)

                gen(2)
                n = max(2, args.steps // 2)
                t_long = best_of(lambda n=n: gen(n), max(1, args.repeats - 1))
                t_short = best_of(lambda: gen(1), max(1, args.repeats - 1))
                step_hf = (t_long - t_short) / (n - 1)
                results[f"decode_ms_hf_b{bs}"] = step_hf * 1e3
                line += f"; transformers generate {step_hf * 1e3:.1f} ms/step -> ratio {step_hf / step_ours:.2f}x"
            print(line, flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
