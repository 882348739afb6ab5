"""Train rnnserve's embedded default model: a small Mamba that completes Python, trained on the
Python standard library's own source (every machine has it; the PSF licence allows it).

    .venv/bin/python scripts/train_default_model.py [--out rnnserve/models/default-mamba-py-v2]

What it does, all seeded (``--seed``) and deterministic for a given Python version and thread count:

1. Corpus: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order,
   without test suites (``test``/``tests``/``idle_test`` folders), installed packages
   (``site-packages``) and generated tables (``encodings``, ``pydoc_data``). Every ``--holdout-every``-th
   file (indices N-1, 2N-1, ...) is held out for evaluation; the rest is the training part.
2. Tokenizer: a byte-level BPE (``tokenizers``) with ``--vocab-size`` entries trained on the training
   part only; id 0 is ``<|endoftext|>``, which separates files and is the end-of-sequence token.
3. Model: transformers' ``MambaForCausalLM`` (fp32, tied embeddings), trained on random windows of
   ``--seq-len`` tokens of the training stream (each file is ``<|endoftext|>`` + its tokens) with
   AdamW, linear warm-up and cosine decay. transformers' CPU fallback scans token by token, and its
   backward through ``A[:, :, t]`` slices costs a full-size gradient tensor per token, so training
   runs the same model through ``forward_logits`` below (same parameters, a cache-friendly scan);
   the two are checked to agree before training starts.
4. Held-out loss: every held-out file as ``<|endoftext|>`` + its tokens, cut into consecutive
   windows of ``--eval-window`` tokens, each scored from a fresh state; the mean cross-entropy (nats)
   over every predicted token, and the same sum divided by the bytes those tokens spell (bits/byte
   is that over ln 2). The first ``--subset-windows`` windows form the subset the test suite
   re-scores (tests/models/test_default.py) through rnnserve's own model code.

``--rescore`` skips training and scores the model already in ``--out`` again (the same held-out
windows), rewriting training.json's figures and the card: a check of the card that takes minutes.

It writes config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, training.json (settings, corpus split, losses, the subset's files and hashes)
and README.md (the model card) into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}

# The sampling a server uses for requests that set none (generation_config.json, as vLLM reads it):
# sampled at temperature 1 a model this small writes noise, near greedy it repeats "#" lines; a low
# temperature with a light repetition penalty gives readable Python.
SAMPLING = {"do_sample": True, "temperature": 0.3, "repetition_penalty": 1.1}

# The user's message becomes a comment (every line prefixed with "# "), a system message too, and an
# assistant's earlier reply is code; the model then continues the file: it completes Python.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}\n"
    "{% else %}# {{ message['content'] | replace('\n', '\n# ') }}\n"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Settings:
    seed: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    state_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    weight_decay: float
    holdout_every: int
    eval_window: int
    subset_windows: int
    threads: int


def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the corpus files, sorted (the order fixes the split and the tokenizer)."""
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS.isdisjoint(rel.parts[:-1]) and p.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def read_corpus(root: Path, names: list[str]) -> dict[str, str]:
    """name -> text; the few files that are not UTF-8 are left out (the same ones on every run)."""
    texts = {}
    for name in names:
        try:
            texts[name] = (root / name).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def split(names: list[str], every: int) -> tuple[list[str], list[str]]:
    """(train, held out): every ``every``-th file of the sorted list is held out."""
    held = [n for i, n in enumerate(names) if i % every == every - 1]
    train = [n for i, n in enumerate(names) if i % every != every - 1]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_files(tok, texts: list[str]) -> list[list[int]]:
    """Each file as [eos] + its tokens (eos opens every file: the model starts a file from it)."""
    eos = tok.token_to_id(EOS)
    return [[eos, *enc.ids] for enc in tok.encode_batch(texts, add_special_tokens=False)]


def token_bytes(tok) -> list[int]:
    """Bytes each id spells: a byte-level token has one character per byte; the special token none."""
    vocab = tok.get_vocab()
    nbytes = [0] * len(vocab)
    for s, i in vocab.items():
        nbytes[i] = 0 if s == EOS else len(s)
    return nbytes


def eval_windows(files: list[list[int]], window: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens of each file (the last one shorter), in file order;
    windows of one token predict nothing and are dropped."""
    out = []
    for ids in files:
        for s in range(0, len(ids), window):
            w = ids[s : s + window]
            if len(w) > 1:
                out.append(w)
    return out


def selective_scan(u, delta, A, B, C, D, z):
    """Mamba's selective scan, differentiable: s_t = exp(Δ_t A) ⊙ s_{t-1} + (Δ_t u_t) ⊗ B_t, y_t = s_t C_t.
    u, delta, z [b, T, E]; A [E, N] (negative); B, C [b, T, N]; D [E] -> y [b, T, E]. One small
    [b, E, N] step per token over tensors unbound along T (their backward is one stack, not a
    full-size gradient per token), so each step's working set stays in cache."""
    T = u.shape[1]
    a = torch.exp(delta.unsqueeze(-1) * A).unbind(1)  # T x [b, E, N]
    x = ((delta * u).unsqueeze(-1) * B.unsqueeze(2)).unbind(1)  # T x [b, E, N]
    c = C.unsqueeze(-1).unbind(1)  # T x [b, N, 1]
    h = x[0]
    ys = [torch.bmm(h, c[0])]
    for t in range(1, T):
        h = torch.addcmul(x[t], a[t], h)
        ys.append(torch.bmm(h, c[t]))  # [b, E, 1]
    y = torch.cat(ys, -1).transpose(1, 2)  # [b, T, E]
    return (y + u * D) * F.silu(z)


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """MambaForCausalLM's forward (no cache) with ``selective_scan`` above: ids [b, T] -> logits [b, T, V]."""
    bb = model.backbone
    h = bb.embeddings(ids)  # [b, T, D]
    T = ids.shape[1]
    for layer in bb.layers:
        m = layer.mixer
        u, z = m.in_proj(layer.norm(h)).chunk(2, dim=-1)  # [b, T, E] each
        u = F.conv1d(
            u.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.conv_kernel_size - 1, groups=u.shape[-1]
        )
        u = F.silu(u[..., :T].transpose(1, 2))
        dt, B, C = m.x_proj(u).split([m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
        delta = F.softplus(m.dt_proj(dt))  # [b, T, E]
        y = selective_scan(u, delta, -torch.exp(m.A_log), B, C, m.D, z)
        h = h + m.out_proj(y)
    return model.lm_head(bb.norm_f(h))


@torch.no_grad()
def score(model, windows: list[list[int]], nbytes: list[int], batch: int = 8) -> dict[str, float]:
    """Summed cross-entropy (nats), predicted tokens and their bytes over the windows."""
    model.eval()
    total, tokens, nb = 0.0, 0, 0
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # similar lengths per batch
    for s in range(0, len(order), batch):
        group = [windows[i] for i in order[s : s + batch]]
        L = max(len(w) for w in group)
        ids = torch.zeros(len(group), L, dtype=torch.long)
        tgt = torch.full((len(group), L - 1), -100, dtype=torch.long)
        for r, w in enumerate(group):
            ids[r, : len(w)] = torch.tensor(w)
            tgt[r, : len(w) - 1] = torch.tensor(w[1:])
            nb += sum(nbytes[t] for t in w[1:])
            tokens += len(w) - 1
        logits = forward_logits(model, ids)[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
    model.train()
    return {
        "nats": total,
        "tokens": tokens,
        "bytes": nb,
        "loss": total / tokens,
        "bits_per_byte": total / nb / math.log(2),
    }


def subset_file_hashes(held_names: list[str], held_files: list[list[int]], texts: dict[str, str], s: Settings):
    """The held-out files the subset's windows come from (the first ones, in order) with their
    sha256, so the test can tell a different standard library from a regression."""
    names, covered = [], 0
    for name, ids in zip(held_names, held_files):
        if covered >= s.subset_windows:
            break
        names.append(name)
        covered += len(eval_windows([ids], s.eval_window))
    return {n: hashlib.sha256(texts[n].encode()).hexdigest() for n in names}


def portable_tokenizer_config(out: Path) -> None:
    """transformers 5 names the class ``TokenizersBackend`` and keeps the chat template in its own
    file; older versions (pyproject allows them) know neither, so name the class they know and put
    the template in tokenizer_config.json too."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_record(out: Path, record: dict, vocab: int) -> None:
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(model_card(out.name, record, vocab))


def rescore(out: Path, s: Settings, texts: dict[str, str], held_names: list[str]) -> int:
    """Score the model already in ``out`` again (no training) and rewrite its figures and card."""
    from tokenizers import Tokenizer
    from transformers import MambaForCausalLM

    record = json.loads((out / "training.json").read_text())
    for key in ("holdout_every", "eval_window"):
        if record["settings"][key] != getattr(s, key):
            raise SystemExit(f"--{key.replace('_', '-')} must be {record['settings'][key]}, as in training")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = MambaForCausalLM.from_pretrained(out).float()
    held_files = encode_files(tok, [texts[n] for n in held_names])
    windows = eval_windows(held_files, s.eval_window)
    nbytes = token_bytes(tok)
    record["held_out"] = score(model, windows, nbytes)
    record["held_out_subset"] = score(model, windows[: s.subset_windows], nbytes)
    record["settings"]["subset_windows"] = s.subset_windows
    record["subset_files"] = subset_file_hashes(held_names, held_files, texts, s)
    print(f"held-out: {record['held_out']}\nsubset: {record['held_out_subset']}", flush=True)
    write_record(out, record, tok.get_vocab_size())
    return 0


def lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def model_card(name: str, r: dict, vocab: int) -> str:
    s = r["settings"]
    held, sub = r["held_out"], r["held_out_subset"]
    n_held = len(r["files"]["held_out"])
    minutes = r["train_seconds"] / 60
    return f"""# {name}

rnnserve's embedded default model: what `rnnserve serve` loads when no `--model` is given. It is a
small Mamba trained briefly on a CPU to **complete Python source code**. It is not a chat or
instruction model and knows nothing beyond the Python standard library's code: asked about the capital
of France it writes Python. Its chat template turns every user (and system) message into a `#` comment
and the model continues the file after it.

## Training data

The `.py` files of the Python {r["python"]} standard library (`sysconfig.get_paths()["stdlib"]`), sorted by
relative path, without test suites (`test/`, `tests/`, `idle_test/`), `site-packages/` and generated tables
(`encodings/`, `pydoc_data/`). Every {s["holdout_every"]}th file of that sorted list ({n_held} files) is held
out; the other {r["files"]["train"]} files ({r["train_bytes"] / 1e6:.1f} MB, {r["train_stream_tokens"]:,} tokens)
are the training part. The held-out file names are listed in `training.json`.

## Tokenizer

Byte-level BPE (`tokenizers`), {vocab} entries, trained on the training part only; any text encodes.
Id 0 is `<|endoftext|>`: it opens every file in training and is the end-of-sequence token. No BOS is added.

## Model

transformers' `MambaForCausalLM`, fp32: d_model {s["hidden_size"]}, {s["num_layers"]} layers, d_inner
{2 * s["hidden_size"]}, state size {s["state_size"]}, conv kernel 4, tied input/output embeddings, vocabulary
{vocab}; {r["parameters"]:,} parameters.

## Training

Seed {s["seed"]}; {s["steps"]} steps of {s["batch_size"]} random windows of {s["seq_len"]} tokens
({r["train_tokens_per_step"]} tokens per step, {s["steps"] * r["train_tokens_per_step"]:,} in all); AdamW
(betas 0.9, 0.95; weight decay {s["weight_decay"]} on matrices), peak learning rate {s["lr"]}, {s["warmup"]}
warm-up steps then cosine decay to a tenth; gradient clipping at 1.0. {minutes:.0f} minutes on
{s["threads"]} CPU thread{"s" if s["threads"] > 1 else ""} (torch {r["torch"]}, a machine shared with other jobs).
Final training loss {r["final_train_loss"]:.3f} (mean of the last 50 steps).

## Held-out loss

Every held-out file as `<|endoftext|>` + its tokens, cut into consecutive windows of {s["eval_window"]} tokens,
each scored from a fresh state; mean cross-entropy over every predicted token:

| set | windows | tokens | loss (nats/token) | bits/byte |
|---|---|---|---|---|
| all held-out files | - | {held["tokens"]:,} | {held["loss"]:.4f} | {held["bits_per_byte"]:.4f} |
| first {s["subset_windows"]} windows (the test's subset) | {s["subset_windows"]} | {sub["tokens"]:,} \
| {sub["loss"]:.4f} | {sub["bits_per_byte"]:.4f} |

For scale: a uniform guess over the vocabulary is ln {vocab} = {math.log(vocab):.2f} nats/token.
`tests/models/test_default.py` re-scores the subset through rnnserve's own Mamba code and checks it is
within 5% of the figure above.

## Reproduce

From the repository root, with the same Python version (the corpus is the running interpreter's
standard library):

```
{r["command"]}
```

The corpus, split and tokenizer come out identical; the weights can differ in the last bits between
CPU kernels and thread counts, so a retrained model's losses agree closely, not bit for bit (this card's
training was run once). To check this card's figures on the shipped weights without training (minutes):

```
python scripts/train_default_model.py --rescore
```

## Licence

The training text is the Python standard library's source, under the Python Software Foundation
License (PSF-2.0). The weights and tokenizer are derived from it; rnnserve itself is Apache-2.0.
"""


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "rnnserve/models/default-mamba-py-v2"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--state-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--holdout-every", type=int, default=20)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--subset-windows", type=int, default=4, help="held-out windows the test suite re-scores")
    p.add_argument(
        "--threads", type=int, default=1, help="1 is fastest on a small or shared machine (no OpenMP barrier stalls)"
    )
    p.add_argument(
        "--rescore", action="store_true", help="no training: score the model in --out again, rewrite its figures"
    )
    args = p.parse_args()
    s = Settings(**{k: v for k, v in vars(args).items() if k not in ("out", "rescore")})

    from transformers import GenerationConfig, MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(s.threads)
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    t_start = time.time()

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = read_corpus(root, stdlib_files(root))
    names = list(texts)
    train_names, held_names = split(names, s.holdout_every)
    print(f"corpus: {len(names)} files under {root}; {len(train_names)} train, {len(held_names)} held out", flush=True)
    if args.rescore:
        return rescore(args.out, s, texts, held_names)

    tok = train_tokenizer([texts[n] for n in train_names], s.vocab_size)
    assert tok.token_to_id(EOS) == 0
    train_files = encode_files(tok, [texts[n] for n in train_names])
    held_files = encode_files(tok, [texts[n] for n in held_names])
    stream = torch.tensor([t for f in train_files for t in f], dtype=torch.long)
    nbytes = token_bytes(tok)
    windows = eval_windows(held_files, s.eval_window)
    subset = windows[: s.subset_windows]
    n_train_bytes = sum(len(texts[n].encode()) for n in train_names)
    print(
        f"tokenizer: {tok.get_vocab_size()} entries; train {len(stream)} tokens"
        f" ({n_train_bytes / len(stream):.2f} bytes/token);"
        f" held out {sum(len(f) for f in held_files)} tokens in {len(windows)} windows ({time.time() - t_start:.0f} s)",
        flush=True,
    )

    config = MambaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        state_size=s.state_size,
        conv_kernel=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = MambaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters ({n_params * 4 / 2**20:.1f} MiB fp32)", flush=True)
    with torch.no_grad():  # selective_scan computes what transformers' forward computes
        probe = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(s.seed))
        ref = model(input_ids=probe).logits
        fast = forward_logits(model, probe)
        assert torch.allclose(ref, fast, atol=1e-4, rtol=1e-4), (ref - fast).abs().max()

    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (decay if prm.ndim >= 2 and "A_log" not in name and "conv1d" not in name else no_decay).append(prm)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(s.seed)
    t_train = time.time()
    loss_log = []
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        starts = torch.randint(0, len(stream) - s.seq_len - 1, (s.batch_size,), generator=gen)
        batch = torch.stack([stream[i : i + s.seq_len + 1] for i in starts.tolist()])  # [b, T+1]
        logits = forward_logits(model, batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_log.append(loss.item())
        if step % 25 == 0 or step == s.steps - 1:
            el = time.time() - t_train
            recent = sum(loss_log[-25:]) / len(loss_log[-25:])
            eta = el / (step + 1) * (s.steps - step - 1)
            print(
                f"step {step}/{s.steps} loss {recent:.3f} lr {lr_at(step, s):.2e} {el:.0f} s (eta {eta:.0f} s)",
                flush=True,
            )
    train_seconds = time.time() - t_train

    held = score(model, windows, nbytes)
    sub = score(model, subset, nbytes)
    print(f"held-out: {held}\nsubset: {sub}", flush=True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, **SAMPLING).save_pretrained(out)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.model_max_length = 1 << 30  # a recurrent model has no context limit of its own
    hf_tok.save_pretrained(out)
    portable_tokenizer_config(out)

    record = {
        "settings": asdict(s),
        "python": platform.python_version(),
        "stdlib": str(root),
        "files": {"train": len(train_names), "held_out": held_names},
        "subset_files": subset_file_hashes(held_names, held_files, texts, s),
        "train_tokens_per_step": s.batch_size * s.seq_len,
        "train_stream_tokens": len(stream),
        "train_bytes": n_train_bytes,
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": sum(loss_log[-50:]) / len(loss_log[-50:]),
        "held_out": held,
        "held_out_subset": sub,
        "torch": torch.__version__,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    write_record(out, record, tok.get_vocab_size())
    print(f"wrote {out} ({time.time() - t_start:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
