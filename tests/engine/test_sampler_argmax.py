"""The sampler's argmax (NumPy on the CPU) picks what torch.argmax picks, and greedy rows of a mixed
batch stay greedy."""

import torch

from rnnserve.engine.request import Request, SamplingParams
from rnnserve.engine.sampler import Sampler, argmax_rows

V = 50280


def test_argmax_rows_equals_torch_argmax_on_ties_nan_inf_and_strided_rows():
    torch.manual_seed(0)
    x = torch.randn(5, V + 8)
    x[0, [7, 9, 50000]] = 1e4  # ties: the first index wins
    x[1] = float("-inf")  # a fully masked row: index 0
    x[2, [11, 300]] = float("nan")  # NaN counts as the maximum, the first one wins
    x[3, V + 3] = 1e5  # past the vocabulary: the sliced view below must not see it
    x[4, -1] = float("inf")
    view = x[:, :V]  # [5, V], not contiguous (the sampler's slice of a padded vocabulary)
    assert not view.is_contiguous()
    assert argmax_rows(view) == view.argmax(dim=-1).tolist()
    assert argmax_rows(x) == x.argmax(dim=-1).tolist()
    assert argmax_rows(x.double()) == x.argmax(dim=-1).tolist()
    bf16 = x.bfloat16()  # no NumPy dtype: torch's argmax
    assert argmax_rows(bf16) == bf16.argmax(dim=-1).tolist()
    assert argmax_rows(torch.empty(0, V)) == []


def test_greedy_rows_of_a_sampled_batch_are_argmax():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    reqs = [
        Request(str(i), [1], SamplingParams(temperature=t, seed=s))
        for i, (t, s) in enumerate([(0.0, None), (0.9, 3), (0.0, None), (1.2, None)])
    ]
    out = Sampler(V, "cpu", seed=0)(logits, reqs)
    expected = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[0], out.token_ids[2]] == [expected[0], expected[2]]
    assert all(isinstance(t, int) and 0 <= t < V for t in out.token_ids)
