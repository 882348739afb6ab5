#!/usr/bin/env bash
# One prepared check for a lent GPU machine (torch + triton + transformers + pytest installed; no
# fastapi, nothing installable; the repo copied without .venv). Runs, each step under its own
# `timeout` and all within GPU_CHECK_BUDGET_S (default 470 s, to finish inside 8 minutes):
#   1. device and library versions
#   2. random ~130M-shaped checkpoints made on the spot (Mamba, Mamba-2, RWKV-4 with transformers;
#      RWKV-7 and RetNet with the test suite's fla-layout writers)
#   3. the Triton kernel tests natively on CUDA (no interpreter)
#   4. the CUDA-graph decode equivalence tests
#   5. an end-to-end greedy check against transformers (Mamba fp32, batch 1 and 8)
#   6. `python3 -m rnnserve.bench.throughput` per family, bf16 first (then Mamba bf16 without CUDA
#      graphs, for comparison) then fp32, batch 1, 32 and 256; what the budget leaves out is "skipped"
# A failing or timed-out step is logged and the script goes on; the summary (stdout and
# $OUT/summary.json) lists every step's status, seconds and log, and the script exits 1 when any
# step failed or timed out (steps the budget left out are "skipped", not failures). Without a CUDA
# GPU it refuses at once (exit 2). Everything it writes (logs, models, caches) is under $OUT.
# Usage, from anywhere:
#   OUT=/some/dir bash scripts/gpu_check.sh
# (GPU_CHECK_BUDGET_S=560 fits more of the fp32 benches into a 600 s command limit.)
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu_check_out}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
PY="${PYTHON:-python3}"
if ! command -v nvidia-smi > /dev/null \
    || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
    echo "gpu_check: error: no CUDA GPU here (no nvidia-smi, or $PY: torch.cuda.is_available() is False);" \
        "run it on a GPU machine" >&2
    exit 2
fi
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
MODELS="${GPU_CHECK_MODELS:-$OUT/models}"
mkdir -p "$OUT/logs" "$MODELS"
# Caches that would otherwise land in $HOME or the repository go under $OUT too.
export TRITON_CACHE_DIR="$OUT/cache/triton" TORCHINDUCTOR_CACHE_DIR="$OUT/cache/inductor" HF_HOME="$OUT/cache/hf"
export MPLCONFIGDIR="$OUT/cache/matplotlib" PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# The machine reaches nothing outside: never let transformers wait on the Hub (kernels, configs).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
unset TRITON_INTERPRET
START=$(date +%s)
STEPS="$OUT/steps.tsv"
: > "$STEPS"

# run_step NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD under `timeout`, never past the budget;
# skipped when fewer than MIN_SECONDS are left.
run_step() {
    local name="$1" max="$2" min="$3"
    shift 3
    local now left limit rc t0 t1 status
    now=$(date +%s)
    left=$((BUDGET - (now - START)))
    if [ "$left" -lt "$min" ]; then
        printf '%s\tskipped\t0\t-\n' "$name" >> "$STEPS"
        echo "== $name: skipped (${left}s left of the budget)"
        return 0
    fi
    limit=$((max < left ? max : left))
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status="failed(rc=$rc)" ;;
    esac
    printf '%s\t%s\t%s\tlogs/%s.log\n' "$name" "$status" "$((t1 - t0))" "$name" >> "$STEPS"
    echo "   $status in $((t1 - t0))s; last lines:"
    tail -n 4 "$OUT/logs/$name.log" | sed 's/^/   | /'
    return 0
}

run_step env 30 5 bash -c "nvidia-smi; $PY -c '
import sys, torch, triton, transformers
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__,
      \"transformers\", transformers.__version__, \"cuda\", torch.version.cuda)
print(\"device\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
'"

run_step make_models 90 30 "$PY" - "$MODELS" <<'PYEOF'
"""Random ~130M-shaped checkpoints, one folder per family; a family that fails is reported and skipped."""
import json
import sys
import traceback
from pathlib import Path

import torch

root = Path(sys.argv[1])
made = {}


def hf(name, make_config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on the CPU
        model = AutoModelForCausalLM.from_config(make_config())
    model.save_pretrained(root / name)


def mamba():
    from transformers import MambaConfig

    return MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4)


def mamba2():
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=50280, hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, expand=2,
        state_size=128, n_groups=1, conv_kernel=4, chunk_size=256, tie_word_embeddings=True,
    )


def rwkv4():
    from transformers import RwkvConfig

    return RwkvConfig(vocab_size=50277, hidden_size=768, num_hidden_layers=12, attention_hidden_size=768,
                      intermediate_size=3072, context_length=1024)


def rwkv7():
    from safetensors.torch import save_file

    import tests.models.test_rwkv7 as t

    t.VOCAB, t.HIDDEN, t.LAYERS, t.FFN = 50277, 768, 12, 3072
    t.RANKS = {"w": 64, "a": 64, "v": 32, "g": 128}
    sd = t._to_fla(t._blinkdl_state_dict(seed=0, hidden=768, head=64))
    folder = root / "rwkv7"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(t._fla_config()))


def retnet():
    import tests.models.test_retnet as t

    t.VOCAB = 32000
    c = t.fla_config(hidden_size=768, num_heads=4, num_hidden_layers=12, intermediate_size=2048,
                     expand_k=1, expand_v=2, vocab_size=32000)
    t.save_folder(root / "retnet", c, t.fla_state_dict(c))


for name, make in [("mamba", lambda: hf("mamba", mamba)), ("mamba2", lambda: hf("mamba2", mamba2)),
                   ("rwkv4", lambda: hf("rwkv4", rwkv4)), ("rwkv7", rwkv7), ("retnet", retnet)]:
    try:
        make()
        made[name] = "ok"
    except Exception:
        traceback.print_exc()
        made[name] = "failed"
    print(name, made[name], flush=True)
(root / "made.json").write_text(json.dumps(made))
sys.exit(0 if all(v == "ok" for v in made.values()) else 1)  # the step fails with any family
PYEOF

run_step kernel_tests 150 40 "$PY" -m pytest -q -p no:cacheprovider -rs tests/kernels -k triton \
    --junitxml="$OUT/kernel_tests.xml"
run_step cuda_graph_tests 120 40 "$PY" -m pytest -q -p no:cacheprovider -rs tests/engine/test_cuda_graph.py \
    --junitxml="$OUT/cuda_graph_tests.xml"

bench() {  # bench STEP_NAME FAMILY DTYPE MAX_SECONDS [throughput args]
    local name="$1" family="$2" dtype="$3" max="$4"
    shift 4
    if [ ! -f "$MODELS/$family/config.json" ]; then
        printf '%s\tskipped\t0\t-\n' "$name" >> "$STEPS"
        echo "== $name: skipped (no $family model)"
        return 0
    fi
    run_step "$name" "$max" 25 "$PY" -m rnnserve.bench.throughput --model "$MODELS/$family" \
        --dtype "$dtype" --device "${GPU_CHECK_DEVICE:-cuda}" --json "$OUT/$name.json" "$@"
}

# Our greedy tokens against transformers' generate() on the GPU (fp32, where they must agree).
bench greedy_vs_hf_mamba_float32 mamba float32 60 --batch-sizes 1,8 --prompt-len 64 --gen-len 16

SIZES=(--batch-sizes 1,32,256 --prompt-len 128 --gen-len 64 --no-baseline)
for family in mamba mamba2 rwkv7 retnet rwkv4; do
    bench "bench_${family}_bfloat16" "$family" bfloat16 60 "${SIZES[@]}"
done
# What the CUDA graphs buy: the same Mamba decode without them.
bench bench_mamba_bfloat16_eager mamba bfloat16 45 --batch-sizes 1,32 --prompt-len 32 --gen-len 64 --no-baseline \
    --enforce-eager
for family in mamba mamba2 rwkv7 retnet rwkv4; do
    bench "bench_${family}_float32" "$family" float32 60 "${SIZES[@]}"
done

"$PY" - "$OUT" "$START" <<'PYEOF'
"""summary.json: every step's status, and the headline figures of each bench JSON."""
import json
import sys
import time
from pathlib import Path

out, start = Path(sys.argv[1]), float(sys.argv[2])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, log = line.split("\t")
    steps.append({"step": name, "status": status, "seconds": int(seconds), "log": log})
benches = {}
for f in sorted(out.glob("*.json")):
    if f.name == "summary.json":
        continue
    try:
        report = json.loads(f.read_text())
    except (OSError, ValueError):
        continue
    rows = []
    for r in report.get("results", []):
        e = r.get("engine") or {}
        rows.append({
            "batch": r.get("batch_size"),
            "prefill_tok_s": e.get("prefill_tok_s"),
            "decode_tok_s": e.get("decode_tok_s"),
            "decode_ms_per_step": 1e3 * e["decode_s"] / max(1, e["decode_tokens"] // r["batch_size"])
            if e.get("decode_s") and r.get("batch_size") else None,
            "greedy_match": r.get("greedy_match"),
        })
    benches[f.stem] = {"device": report.get("device"), "dtype": report.get("dtype"), "rows": rows}
summary = {"total_seconds": round(time.time() - start), "steps": steps, "benches": benches}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"\n==== summary ({summary['total_seconds']}s) ====")
for s in steps:
    print(f"{s['step']:<32} {s['status']:<16} {s['seconds']:>4}s  {s['log']}")
for name, b in benches.items():
    for r in b["rows"]:
        ms = f"{r['decode_ms_per_step']:.2f}" if r["decode_ms_per_step"] else "-"
        print(f"{name:<32} B={r['batch']:<4} prefill {r['prefill_tok_s'] or 0:>12,.0f} tok/s  "
              f"decode {r['decode_tok_s'] or 0:>10,.0f} tok/s  {ms} ms/step  match {r['greedy_match']}")
PYEOF

# Exit status: 1 when a step failed or timed out (the summary above says which).
if cut -f2 "$STEPS" | grep -q -v -E '^(ok|skipped)$'; then
    echo "gpu_check: some steps failed or timed out (see $OUT/summary.json)" >&2
    exit 1
fi
