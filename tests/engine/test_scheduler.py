"""Scheduler unit tests, with a fake runner that only advances progress and appends a token."""

import pytest
import torch

from rnnserve.config import SchedulerConfig, StatePoolConfig
from rnnserve.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from rnnserve.engine.scheduler import CPU_PREFILL_PACK_TOKENS, Scheduler, SchedulerOutput
from rnnserve.engine.state_pool import StatePool
from rnnserve.models.base import StateSpec

SPECS = [[StateSpec("h", (4,), torch.float32)]]


def make(budget: int, slots: int = 4, max_num_seqs: int = 64) -> Scheduler:
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=slots), "cpu")
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs), pool)


def req(rid: str, n_prompt: int, max_tokens: int = 3) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))


def fake_run(sched: Scheduler, out: SchedulerOutput) -> list[Request]:
    """Advance each scheduled request; requests whose tokens are all computed get a new token and
    finish at max_tokens. Returns the finished ones."""
    done = []
    for s in out.scheduled:
        completes = s.completes_prompt
        s.request.num_computed_tokens += s.num_tokens
        if completes:
            s.request.output_token_ids.append(7)
            if len(s.request.output_token_ids) >= s.request.params.max_tokens:
                sched.finish(s.request, FinishReason.LENGTH)
                done.append(s.request)
    return done


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_tokens) for s in out.scheduled]


def test_budget_decodes_first_and_chunked_prefill():
    sched = make(budget=8)
    sched.add(req("a", 3))
    sched.add(req("long", 20))
    out = sched.schedule()
    assert plan(out) == [("a", 3), ("long", 5)]
    fake_run(sched, out)
    # "a" decodes first (1 token), the long prompt takes the rest of the budget.
    out = sched.schedule()
    assert plan(out) == [("a", 1), ("long", 7)]
    assert out.scheduled[0].is_decode and not out.scheduled[1].is_decode
    fake_run(sched, out)
    sched.add(req("b", 2))
    out = sched.schedule()
    assert plan(out) == [("a", 1), ("long", 7)]  # no budget left for "b"
    assert out.num_batched_tokens == 8
    fake_run(sched, out)  # "a" finishes (3 tokens), "long" has 1 prompt token left
    out = sched.schedule()
    assert plan(out) == [("long", 1), ("b", 2)]
    assert out.scheduled[0].completes_prompt and not out.scheduled[0].is_decode


def test_every_step_respects_budget_and_everything_finishes():
    sched = make(budget=5, slots=3)
    lengths = [1, 9, 4, 13, 2, 6]
    for i, n in enumerate(lengths):
        sched.add(req(f"r{i}", n, max_tokens=4))
    finished = []
    for _ in range(200):
        out = sched.schedule()
        if out.is_empty:
            break
        assert out.num_batched_tokens <= 5
        assert len(sched.running) <= 3
        kinds = [s.is_decode for s in out.scheduled]
        assert kinds == sorted(kinds, reverse=True)  # decodes before prefill chunks
        finished += fake_run(sched, out)
    assert sorted(r.request_id for r in finished) == [f"r{i}" for i in range(len(lengths))]
    assert all(len(r.output_token_ids) == 4 for r in finished)
    assert sched.pool.num_used == 0 and sched.pool.num_free == 3


def test_admission_needs_a_free_slot():
    sched = make(budget=100, slots=2)
    for i in range(3):
        sched.add(req(f"r{i}", 2, max_tokens=2))
    out = sched.schedule()
    assert plan(out) == [("r0", 2), ("r1", 2)]
    assert sched.num_waiting == 1 and sched.pool.num_free == 0
    fake_run(sched, out)
    out = sched.schedule()
    assert plan(out) == [("r0", 1), ("r1", 1)]  # still no slot for r2
    fake_run(sched, out)  # both finish
    out = sched.schedule()
    assert plan(out) == [("r2", 2)]
    assert out.scheduled[0].request.slot in (1, 2)


def test_max_num_seqs_limits_running():
    sched = make(budget=100, slots=8, max_num_seqs=2)
    for i in range(3):
        sched.add(req(f"r{i}", 2))
    assert [rid for rid, _ in plan(sched.schedule())] == ["r0", "r1"]


def test_abort_waiting_running_and_prefilling_frees_slots():
    sched = make(budget=6, slots=2)
    sched.add(req("dec", 2))
    sched.add(req("pre", 30))
    sched.add(req("wait", 3))
    fake_run(sched, sched.schedule())  # dec -> decoding, pre -> 4 of 30 prompt tokens
    assert sched.pool.num_used == 2
    pre = sched.get("pre")
    assert pre is not None and pre.is_prefilling
    assert sched.abort("wait") is not None
    assert sched.abort("pre").finish_reason is FinishReason.ABORT
    assert pre.status is RequestStatus.FINISHED and pre.slot is None
    assert sched.pool.num_used == 1
    assert sched.abort("dec") is not None
    assert sched.abort("dec") is None  # unknown now: a no-op
    assert sched.abort("never") is None
    assert sched.pool.num_used == 0 and not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_duplicate_request_id_rejected():
    sched = make(budget=4)
    sched.add(req("a", 2))
    with pytest.raises(ValueError, match="already"):
        sched.add(req("a", 2))


def client_req(rid: str, client: str, max_tokens: int = 1) -> Request:
    return Request(rid, [1, 2], SamplingParams(max_tokens=max_tokens, client=client))


def test_waiting_requests_are_admitted_round_robin_across_clients():
    """A quiet client's new request goes before a busy client's backlog; FIFO within a client."""
    sched = make(budget=64, slots=2)
    for i in range(5):
        sched.add(client_req(f"b{i}", "busy"))
    sched.add(client_req("q0", "quiet"))
    out = sched.schedule()
    assert [rid for rid, _ in plan(out)] == ["b0", "q0"]  # not b0, b1 (arrival order)
    fake_run(sched, out)
    sched.add(client_req("q1", "quiet"))
    out = sched.schedule()
    assert [rid for rid, _ in plan(out)] == ["b1", "q1"]  # busy was served before quiet: its turn first
    fake_run(sched, out)
    out = sched.schedule()
    assert [rid for rid, _ in plan(out)] == ["b2", "b3"]  # one client left: arrival order


def test_a_preempted_request_is_admitted_before_other_clients():
    sched = make(budget=64, slots=1)
    first = Request("a", [1, 2], SamplingParams(max_tokens=4, client="x"))
    sched.add(first)
    out = sched.schedule()
    fake_run(sched, out)
    sched.add(client_req("q", "quiet"))  # a client never served: next in the round-robin
    sched._preempt(first, out)  # as _reserve does when KV blocks run out
    assert first.status is RequestStatus.WAITING and sched.pool.num_free == 1
    out = sched.schedule()
    assert [rid for rid, _ in plan(out)] == ["a"]  # recomputed first
    assert out.scheduled[0].num_tokens == 2  # its prompt first, then its output token


def test_a_client_holding_every_slot_gives_one_back_to_a_new_client():
    sched = make(budget=64, slots=4)
    for i in range(6):
        sched.add(client_req(f"b{i}", "busy", max_tokens=8))
    fake_run(sched, sched.schedule())  # b0..b3 hold every slot, b4 and b5 wait
    sched.add(client_req("q0", "quiet", max_tokens=8))
    out = sched.schedule()
    assert ("q0", 2) in plan(out) and sched.num_preemptions == 1
    assert sorted(r.request_id for r in sched.running) == ["b0", "b1", "b2", "q0"]  # b3, the youngest, went back
    b3 = sched.get("b3")
    assert b3 is not None and b3.status is RequestStatus.WAITING and b3.num_computed_tokens == 0
    assert sched.waiting[0] is b3  # busy's oldest waiting request: FIFO within the client
    fake_run(sched, out)
    # 3 against 1 running: busy still runs two more, so q1 takes one more slot.
    sched.add(client_req("q1", "quiet", max_tokens=8))
    fake_run(sched, sched.schedule())
    assert sched.num_preemptions == 2
    assert sorted(r.request_id for r in sched.running) == ["b0", "b1", "q0", "q1"]
    # 2 against 2: no one runs more than its share, q2 waits for a slot.
    sched.add(client_req("q2", "quiet", max_tokens=8))
    sched.schedule()
    assert sched.num_preemptions == 2 and sched.get("q2").status is RequestStatus.WAITING


def test_a_new_client_gets_a_step_of_its_own_before_a_busy_clients_decodes():
    sched = make(budget=64, slots=8)
    for i in range(4):
        sched.add(client_req(f"b{i}", "busy", max_tokens=8))
    fake_run(sched, sched.schedule())  # b0..b3 have their first token: decodes next
    sched.add(client_req("q0", "quiet", max_tokens=8))
    sched.add(client_req("n0", "new", max_tokens=8))
    out = sched.schedule()
    assert plan(out) == [("q0", 2), ("n0", 2)]  # newcomers alone: their first token after one short step
    fake_run(sched, out)
    sched.add(client_req("q1", "quiet", max_tokens=8))  # quiet runs one now: no newcomer any more
    out = sched.schedule()
    assert [rid for rid, _ in plan(out)] == ["b0", "b1", "b2", "b3", "q0", "n0", "q1"]
    assert [s.is_decode for s in out.scheduled] == [True] * 6 + [False]
    # One client alone (a load generator, a proxy): decodes first, as always.
    solo = make(budget=64, slots=8)
    for i in range(3):
        solo.add(client_req(f"s{i}", "solo", max_tokens=8))
    fake_run(solo, solo.schedule())
    solo.add(client_req("s3", "solo", max_tokens=8))
    assert [rid for rid, _ in plan(solo.schedule())] == ["s0", "s1", "s2", "s3"]


def test_simultaneous_prompts_on_a_cpu_are_prefilled_one_after_another():
    """First come, first prefilled: with the CPU default, prompts that arrive together take steps one
    after another (each of its own, with the decodes of those already done), so the first gets its
    token after one prompt's step rather than after a step of all of them."""
    sched = make(budget=2048, slots=8)
    assert sched.prefill_pack_tokens == CPU_PREFILL_PACK_TOKENS
    for i in range(3):
        sched.add(req(f"r{i}", 200, max_tokens=4))
    steps = []
    for _ in range(3):
        out = sched.schedule()
        steps.append(plan(out))
        fake_run(sched, out)
    assert steps == [[("r0", 200)], [("r0", 1), ("r1", 200)], [("r0", 1), ("r1", 1), ("r2", 200)]]


def test_short_prompts_share_a_step_up_to_prefill_pack_tokens():
    sched = make(budget=2048, slots=8)
    for i in range(5):
        sched.add(req(f"r{i}", 30))
    # 30 + 30 < 64: a third prompt joins; 90 >= 64: no fourth. A chunk is never cut to the limit.
    assert plan(sched.schedule()) == [("r0", 30), ("r1", 30), ("r2", 30)]


def test_a_long_prompt_takes_whole_steps_and_its_last_chunk_shares_one():
    sched = make(budget=100, slots=8)
    sched.add(req("long", 250))
    sched.add(req("b", 20))
    for _ in range(2):
        out = sched.schedule()
        assert plan(out) == [("long", 100)]  # 100 >= 64: b waits
        fake_run(sched, out)
    assert plan(sched.schedule()) == [("long", 50), ("b", 20)]


def test_prefill_pack_tokens_at_the_budget_packs_every_arrival_into_one_step():
    """The GPU default (the whole budget), or any value the user sets."""
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=8), "cpu")
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=2048, prefill_pack_tokens=2048), pool)
    for i in range(3):
        sched.add(req(f"r{i}", 200))
    assert plan(sched.schedule()) == [("r0", 200), ("r1", 200), ("r2", 200)]
    meta = StatePool(SPECS, StatePoolConfig(max_num_seqs=8), "meta")
    assert Scheduler(SchedulerConfig(max_num_batched_tokens=512), meta).prefill_pack_tokens == 512
