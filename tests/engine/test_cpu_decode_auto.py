"""``--cpu-decode auto``: the runner picks the fused decode on the CPU for a supported model (prepared on a
background thread, switched to at a step boundary) and the torch path, with a log line saying why, for an
unsupported model, a CPU without AVX2 or a failed build; a switch in the middle of decoding gives the same
greedy tokens as the torch path alone and the fused path alone."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from rnnserve.config import ModelConfig, RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import LLMEngine, SamplingParams, cpu_decode_auto
from rnnserve.engine import cpu_decode as engine_cpu_decode
from rnnserve.engine.cpu_decode import FusedMambaDecoder
from rnnserve.engine.cpu_decode_auto import SwitchingDecoder
from rnnserve.engine.runner import ModelRunner
from rnnserve.engine.state_pool import StatePool
from rnnserve.kernels import cpu_decode
from rnnserve.models.base import DecodeBatch, RecurrentLM
from rnnserve.models.loader import load_model
from tests.engine.fake_model import FakeRecurrentLM

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None, reason="no AVX2/FMA on this CPU")
# The background thread may have to build the kernels (an edited source or header): minutes on a loaded machine.
BUILD_S = 900


@pytest.fixture(scope="module")
def mamba(tmp_path_factory) -> RecurrentLM:
    from transformers import MambaConfig

    from tests.conftest import build_random_hf_model

    cfg = MambaConfig(hidden_size=36, num_hidden_layers=2, vocab_size=101, state_size=12, expand=2, conv_kernel=4)
    folder = tmp_path_factory.mktemp("mamba_auto")
    build_random_hf_model(cfg, jitter=0.05).save_pretrained(folder)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", kernels="torch")).model


def _runner(model: RecurrentLM, choice: str = "auto") -> ModelRunner:
    pool = StatePool(model.state_specs(), StatePoolConfig(max_num_seqs=4), torch.device("cpu"))
    return ModelRunner(model, pool, RunnerConfig(cpu_decode=choice))


def _one_step(runner: ModelRunner) -> torch.Tensor:
    batch = DecodeBatch(torch.tensor([3]), torch.zeros(1, dtype=torch.long), torch.tensor([0]))
    with torch.inference_mode():
        return runner._run_decode(batch)


def test_auto_picks_fused_for_a_supported_model(mamba, caplog) -> None:
    with caplog.at_level(logging.INFO):
        runner = _runner(mamba)
    decoder = runner._decoder
    assert isinstance(decoder, SwitchingDecoder)
    assert "decoding MambaLM with the fused C++ decode" in caplog.text
    assert decoder.wait(BUILD_S)
    _one_step(runner)  # the step boundary where it switches
    assert decoder.fused and isinstance(decoder._decoder, FusedMambaDecoder)


def test_auto_keeps_torch_for_an_unsupported_model(caplog) -> None:
    with caplog.at_level(logging.INFO):
        runner = _runner(FakeRecurrentLM())
    assert not isinstance(runner._decoder, SwitchingDecoder)
    assert "--cpu-decode auto: decoding with the torch path: FakeRecurrentLM has no fused CPU decode" in caplog.text


def test_auto_keeps_torch_without_avx2(mamba, monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu_decode_auto.cpu_decode, "unavailable_reason", lambda: "the CPU lacks AVX2/FMA (test)")
    with caplog.at_level(logging.INFO):
        runner = _runner(mamba)
    assert not isinstance(runner._decoder, SwitchingDecoder)
    assert "decoding with the torch path: the CPU lacks AVX2/FMA (test)" in caplog.text


def test_auto_keeps_torch_when_the_build_fails(mamba, monkeypatch) -> None:
    """No compiler or a failed build: ``load`` says None in the background and the torch path stays."""
    monkeypatch.setattr(engine_cpu_decode.cpu_decode, "load", lambda: None)
    runner = _runner(mamba)
    decoder = runner._decoder
    assert isinstance(decoder, SwitchingDecoder) and decoder.wait(60)
    torch_logits = _one_step(_runner(mamba, "torch"))
    torch.testing.assert_close(_one_step(runner), torch_logits)
    assert not decoder.fused


def test_auto_keeps_torch_when_preparing_raises(mamba, monkeypatch, caplog) -> None:
    def broken(model: RecurrentLM, states) -> None:
        raise RuntimeError("packing failed (test)")

    monkeypatch.setattr(cpu_decode_auto, "fused_decoder", broken)
    with caplog.at_level(logging.ERROR):
        decoder = _runner(mamba)._decoder
        assert isinstance(decoder, SwitchingDecoder) and decoder.wait(60)
    assert "preparing the fused decode failed" in caplog.text and not decoder.fused


def _generate(
    model: RecurrentLM, choice: str, release: threading.Event | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens of three requests and each token's logprob (which depends on the whole state, where
    a random model's greedy token may not); with ``release``, the fused decode becomes ready only when
    the event is set, after the 5th step (prefills and a few decodes on the torch path)."""
    engine = LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=4),
        SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=4),
        RunnerConfig(cpu_decode=choice),
        eos_token_id=None,
    )
    prompts = [[5, 17, 3, 88, 1], [9, 9, 40, 2], [60, 1, 2, 3, 4, 5, 6]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    ids: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    logprobs: dict[str, list[float]] = {str(i): [] for i in range(len(prompts))}
    steps = 0
    while engine.has_unfinished():
        if release is not None and steps == 5:
            decoder = engine.runner._decoder
            assert isinstance(decoder, SwitchingDecoder) and not decoder.fused
            release.set()
            assert decoder.wait(BUILD_S)
        for o in engine.step():
            ids[o.request_id].extend(o.new_token_ids)
            logprobs[o.request_id].extend(lp.logprob for lp in o.new_logprobs or [])
        steps += 1
    if release is not None:
        decoder = engine.runner._decoder
        assert isinstance(decoder, SwitchingDecoder) and decoder.fused and decoder._steps >= 3
    keys = [str(i) for i in range(len(prompts))]
    return [ids[k] for k in keys], [logprobs[k] for k in keys]


def test_switch_at_a_step_boundary_keeps_greedy_tokens(mamba, monkeypatch) -> None:
    """The fused decode continues from the states the torch path left: the same tokens, and logprobs
    within float32 rounding of the two paths (a switch onto zeroed state pools moved them by up to 0.37,
    with the same tokens)."""
    torch_ids, torch_lp = _generate(mamba, "torch")
    fused_ids, fused_lp = _generate(mamba, "fused")
    assert fused_ids == torch_ids and all(len(t) == 16 for t in torch_ids)
    torch.testing.assert_close(torch.tensor(fused_lp), torch.tensor(torch_lp), rtol=0, atol=1e-4)

    release = threading.Event()
    real = cpu_decode_auto.fused_decoder

    def gated(model: RecurrentLM, states):
        assert release.wait(BUILD_S)
        return real(model, states)

    monkeypatch.setattr(cpu_decode_auto, "fused_decoder", gated)
    auto_ids, auto_lp = _generate(mamba, "auto", release)
    assert auto_ids == torch_ids
    torch.testing.assert_close(torch.tensor(auto_lp), torch.tensor(torch_lp), rtol=0, atol=1e-4)


def test_the_server_flag_defaults_to_auto() -> None:
    from rnnserve.cli import build_parser, configs_from_args

    parse = build_parser().parse_args
    assert configs_from_args(parse(["serve"])).runner.cpu_decode == "auto"
    assert configs_from_args(parse(["serve", "--cpu-decode", "torch"])).runner.cpu_decode == "torch"
    assert configs_from_args(parse(["serve", "--compile"])).runner.compile_cpu_decode
