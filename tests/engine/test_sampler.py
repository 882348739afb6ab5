import math

import pytest
import torch

from rnnserve.engine.request import Request, SamplingParams
from rnnserve.engine.sampler import Sampler

V = 10


def mk(rid: str, prompt=(1, 2), out=(), eos: int | None = None, **kw) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**kw), eos_token_id=eos)
    r.output_token_ids = list(out)
    return r


def full_logprobs(sampler: Sampler, logits: torch.Tensor, r: Request) -> torch.Tensor:
    """The sampler's logprobs of every token for one request (top = whole vocab)."""
    res = sampler(logits.view(1, -1), [r])
    lp = res.logprobs[0]
    assert lp is not None and len(lp.top) == V
    return torch.tensor([lp.top[i] for i in range(V)])


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    s = Sampler(V, "cpu", seed=0)
    reqs = [mk(f"g{i}", temperature=0.0) for i in range(3)] + [mk(f"k{i}", top_k=1, temperature=1.5) for i in range(3)]
    out = s(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_is_independent_of_the_batch():
    torch.manual_seed(1)
    steps = [torch.randn(4, V) for _ in range(12)]

    def run(batch_order: list[int], with_others: bool) -> list[int]:
        s = Sampler(V, "cpu")
        target = mk("t", seed=1234, temperature=1.0, top_p=0.95)
        others = [mk("u", temperature=1.0), mk("v", seed=7, temperature=0.7), mk("w", temperature=0.0)]
        toks = []
        for logits in steps:
            rows = [0] + ([1, 2, 3] if with_others else [])
            rows = [rows[i] for i in batch_order if i < len(rows)]
            reqs = [([target, *others])[r] for r in rows]
            out = s(logits[rows], reqs)
            for req, tok in zip(reqs, out.token_ids):
                req.output_token_ids.append(tok)
            toks.append(out.token_ids[rows.index(0)])
        return toks

    alone = run([0], with_others=False)
    assert run([0, 1, 2, 3], with_others=True) == alone
    assert run([3, 1, 0, 2], with_others=True) == alone
    assert len(set(alone)) > 1  # it really sampled
    other_seed = Sampler(V, "cpu")
    r = mk("t", seed=99, temperature=1.0)
    assert [other_seed(steps[i][:1], [r]).token_ids[0] for i in range(12)] != alone


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(1000, 1)
    s = Sampler(4, "cpu", seed=0)
    toks = torch.tensor(s(logits, [mk(f"r{i}") for i in range(1000)]).token_ids)
    freq = torch.bincount(toks, minlength=4).float() / 1000
    torch.testing.assert_close(freq, probs, atol=0.05, rtol=0)


def test_top_p_min_p_and_temperature_truncate():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]]).repeat(300, 1)
    p = torch.softmax(logits[0], -1)
    s = Sampler(V, "cpu", seed=0)
    # top_p just above p0 keeps tokens 0 and 1 only.
    toks = set(s(logits, [mk(f"p{i}", top_p=float(p[0]) + 0.01) for i in range(300)]).token_ids)
    assert toks == {0, 1}
    # min_p: token 1 has p1/p0 = exp(-0.5) ~ 0.61, token 2 ~ 0.05.
    toks = set(s(logits, [mk(f"m{i}", min_p=0.5) for i in range(300)]).token_ids)
    assert toks == {0, 1}
    toks = set(s(logits, [mk(f"k{i}", top_k=2, temperature=5.0) for i in range(300)]).token_ids)
    assert toks == {0, 1}


def test_repetition_penalty_hf_semantics():
    torch.manual_seed(2)
    logits = torch.randn(V) * 2
    r = mk("r", prompt=(1, 2), out=(2, 5), temperature=0.0, repetition_penalty=1.7, logprobs=V)
    want = logits.clone()
    for t in (1, 2, 5):
        want[t] = want[t] / 1.7 if want[t] > 0 else want[t] * 1.7
    got = full_logprobs(Sampler(V, "cpu"), logits, r)
    torch.testing.assert_close(got, torch.log_softmax(want, -1))


def test_presence_and_frequency_penalties_openai_semantics():
    torch.manual_seed(3)
    logits = torch.randn(V)
    r = mk(
        "r", prompt=(1, 4), out=(2, 2, 2, 6), temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, logprobs=V
    )
    want = logits.clone()
    want[2] -= 0.5 + 3 * 0.3
    want[6] -= 0.5 + 0.3  # prompt tokens 1 and 4 are not penalised
    got = full_logprobs(Sampler(V, "cpu"), logits, r)
    torch.testing.assert_close(got, torch.log_softmax(want, -1))


def test_penalties_of_a_batch_are_each_rows_own():
    """Rows with and without penalties, repeated and out-of-vocabulary token ids, in one batch: each
    row's logprobs are those of its penalties alone (HF repetition, OpenAI presence / frequency)."""
    torch.manual_seed(4)
    logits = torch.randn(6, V) * 2
    rows = [
        mk("a", prompt=(1, 2, 2, V + 3), out=(5, 5), temperature=0.0, repetition_penalty=1.3, logprobs=V),
        mk(
            "b", prompt=(3,), out=(4, 4, 4, 7), temperature=0.0, presence_penalty=0.5, frequency_penalty=0.2, logprobs=V
        ),
        mk("c", prompt=(0, 9), out=(), temperature=0.0, logprobs=V),
        mk(
            "d",
            prompt=(6, 8),
            out=(8, 1, V),
            temperature=0.0,
            repetition_penalty=0.8,
            frequency_penalty=-0.4,
            logprobs=V,
        ),
        mk("e", prompt=(2,), out=(), temperature=0.0, presence_penalty=1.0, logprobs=V),  # no output yet
        mk("f", prompt=(5,), out=(3,), temperature=0.0, repetition_penalty=2.0, presence_penalty=-0.7, logprobs=V),
    ]
    want = logits.clone()
    for b, r in enumerate(rows):
        p = r.params
        for t in {t for t in r.prompt_token_ids + r.output_token_ids if t < V}:
            if p.repetition_penalty != 1.0:
                want[b, t] = want[b, t] / p.repetition_penalty if want[b, t] > 0 else want[b, t] * p.repetition_penalty
        for t in {t for t in r.output_token_ids if t < V}:
            want[b, t] -= p.frequency_penalty * r.output_token_ids.count(t) + p.presence_penalty
    res = Sampler(V, "cpu")(logits, rows)
    for b, lp in enumerate(res.logprobs):
        assert lp is not None
        got = torch.tensor([lp.top[i] for i in range(V)])
        torch.testing.assert_close(got, torch.log_softmax(want[b], -1))
    assert res.token_ids == want.argmax(-1).tolist()


def test_temperature_scales_logprobs():
    logits = torch.randn(V)
    got = full_logprobs(Sampler(V, "cpu"), logits, mk("r", temperature=2.0, logprobs=V))
    torch.testing.assert_close(got, torch.log_softmax(logits / 2.0, -1))


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, 3] = 10.0  # eos
    logits[0, 4] = 9.0  # stop token
    s = Sampler(V, "cpu")
    early = mk("r", eos=3, out=(1,), temperature=0.0, min_tokens=2, stop_token_ids=(4,))
    assert s(logits, [early]).token_ids[0] not in (3, 4)
    late = mk("r", eos=3, out=(1, 1), temperature=0.0, min_tokens=2, stop_token_ids=(4,))
    assert s(logits, [late]).token_ids == [3]


def test_logprobs_shapes_and_chosen_token():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    s = Sampler(V, "cpu", seed=0)
    reqs = [mk("a", logprobs=3, temperature=0.0), mk("b"), mk("c", logprobs=0, temperature=0.8, seed=3)]
    out = s(logits, reqs)
    assert out.logprobs[1] is None
    a, c = out.logprobs[0], out.logprobs[2]
    assert a is not None and c is not None
    assert a.token_id == out.token_ids[0] and len(a.top) == 3 and c.top == {}
    ref = torch.log_softmax(logits[0], -1)
    assert a.logprob == pytest.approx(float(ref.max()), abs=1e-5)
    assert list(a.top) == ref.topk(3).indices.tolist()
    assert c.logprob == pytest.approx(float(torch.log_softmax(logits[2] / 0.8, -1)[out.token_ids[2]]), abs=1e-5)
    full = full_logprobs(s, logits[0], mk("d", logprobs=V))
    assert math.isclose(float(full.exp().sum()), 1.0, abs_tol=1e-5)


def test_logit_bias_moves_greedy_and_sampled_choices_and_leaves_other_rows():
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    s = Sampler(V, "cpu", seed=0)
    top = logits.argmax(-1).tolist()
    second = logits[1].topk(2).indices[1].item()
    reqs = [
        mk("force", temperature=0.0, logit_bias=((7, 100.0),)),
        mk("ban", temperature=0.0, logit_bias=((top[1], -100.0), (V + 5, 100.0))),  # an id past V is ignored
        mk("plain", temperature=0.0),
    ]
    out = s(logits, reqs)
    assert out.token_ids == [7, second, top[2]]
    # Sampled: every token but 3 pushed down by 100 leaves 3 all the probability a float32 softmax holds.
    only3 = tuple((t, -100.0) for t in range(V) if t != 3)
    sampled = [mk(f"s{i}", temperature=1.0, seed=i, logit_bias=only3) for i in range(4)]
    assert s(torch.randn(4, V), sampled).token_ids == [3, 3, 3, 3]


def test_logit_bias_logprobs_are_of_the_biased_distribution_and_the_caller_logits_stay():
    logits = torch.zeros(1, V)
    s = Sampler(V, "cpu", seed=0)
    r = mk("lp", temperature=0.0, logprobs=2, logit_bias=((2, 1.0), (2, 1.0)))  # a repeated id adds up
    lp = s(logits, [r]).logprobs[0]
    assert lp is not None and lp.token_id == 2
    assert lp.logprob == pytest.approx(2.0 - math.log(math.exp(2.0) + V - 1), abs=1e-5)
    assert torch.equal(logits, torch.zeros(1, V))


@pytest.mark.parametrize("bias", [((1, 100.5),), ((1, -101.0),), ((-1, 1.0),), ((1, float("nan")),)])
def test_logit_bias_out_of_range_is_refused(bias):
    from rnnserve.engine.request import SamplingParamsError

    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(logit_bias=bias)
    assert err.value.param == "logit_bias"
