"""``--quantization int8`` (layers.Int8Linear) against float32.

Tolerances: one Int8Linear is within 3% (relative RMS) of the float32 product on Gaussian inputs;
whole tiny Mamba / Mamba-2 models give logits within 8% of the largest float32 logit and the same
greedy tokens. Each row is quantized on its own scale, so a row's output does not depend on its batch:
that is asserted exactly (bitwise), at batch 1, 3 and 33.
"""

from __future__ import annotations

import pytest
import torch

from rnnserve.config import ModelConfig
from rnnserve.models.layers import Int8Linear
from rnnserve.models.loader import ModelLoadError, load_model
from tests.models.harness import alloc_states, greedy_generate, prefill_in_chunks


def _rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def test_int8_linear_close_to_fp32_and_batch_invariant() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80)
    q = Int8Linear(lin.weight, lin.bias)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (80,)
    # Dequantized weights are the float32 weights to within half a step of each row's scale.
    assert ((q.qweight.float() * q.scale[:, None] - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(33, 96) * torch.logspace(-2, 2, 33)[:, None]  # rows of very different magnitudes
    with torch.no_grad():
        ref, out = lin(x), q(x)
        assert _rel_rms(out, ref) < 0.03
        alone = torch.cat([q(x[i : i + 1]) for i in range(33)])
        assert torch.equal(alone, out)
        assert torch.equal(q(x[:3]), out[:3])
        assert torch.equal(q(x.view(3, 11, 96)), out.view(3, 11, 80))  # any leading shape


def _mamba_config():
    from transformers import MambaConfig

    return MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=120, state_size=8, expand=2, conv_kernel=4)


def _mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=120, num_heads=8, head_dim=16, state_size=16, n_groups=2
    )


@pytest.mark.parametrize("make_config", [_mamba_config, _mamba2_config], ids=["mamba", "mamba2"])
def test_int8_model_close_to_fp32(hf_model_dir, make_config) -> None:
    folder, _ = hf_model_dir(make_config(), jitter=0.02)
    ref = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu")).model
    q = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", quantization="int8")).model
    assert isinstance(q.lm_head, Int8Linear)
    prompts = [[(7 * i + 3 * b) % 110 + 5 for i in range(9 + 4 * b)] for b in range(33)]
    slots = list(range(1, 34))
    with torch.inference_mode():
        ref_logits = prefill_in_chunks(ref, alloc_states(ref, 34), prompts, slots, 4)  # chunked: resumed states
        q_logits = prefill_in_chunks(q, alloc_states(q, 34), prompts, slots, 4)
        assert (q_logits - ref_logits).abs().max() <= 0.08 * ref_logits.abs().max()
        # Batch-invariant: the batch of 33 gives each sequence what it gets alone (bitwise).
        for b in (0, 2, 32):
            alone = prefill_in_chunks(q, alloc_states(q, 2), [prompts[b]], [1], 4)[0]
            assert torch.equal(alone, q_logits[b])
    # Greedy tokens equal float32's (these prompts' top-2 margins are wider than the int8 error).
    for prompt in prompts[:3]:
        assert greedy_generate(q, prompt, 6) == greedy_generate(ref, prompt, 6)


def test_int8_refused_where_not_supported(hf_model_dir) -> None:
    import transformers

    from tests.models.test_bamba import _config

    folder, _ = hf_model_dir(_config(), transformers.BambaForCausalLM)  # a hybrid without quantize_int8
    with pytest.raises(ModelLoadError, match="not implemented"):
        load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", quantization="int8"))


def test_int8_refused_for_bf16(hf_model_dir) -> None:
    folder, _ = hf_model_dir(_mamba_config())
    with pytest.raises(ModelLoadError, match="float32 only"):
        load_model(ModelConfig(model=str(folder), dtype="bfloat16", device="cpu", quantization="int8"))
