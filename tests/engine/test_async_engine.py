"""AsyncEngine: streaming, abort, early-closing consumers, input errors, step failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from rnnserve.config import RunnerConfig, SchedulerConfig, StatePoolConfig
from rnnserve.engine import AsyncEngine, EngineInputError, FinishReason, LLMEngine, RequestOutput, SamplingParams
from tests.engine.fake_model import FakeRecurrentLM
from tests.models.harness import greedy_generate

VOCAB = 97
ENDLESS = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)


def make(model: FakeRecurrentLM, slots: int = 4, budget: int = 32) -> AsyncEngine:
    engine = LLMEngine(
        model,
        StatePoolConfig(max_num_seqs=slots),
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=slots, max_model_len=1000),
        RunnerConfig(),
        eos_token_id=None,
    )
    return AsyncEngine(engine)


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def collect(ae: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    return [o async for o in ae.generate(rid, prompt, params)]


def test_generate_streams_concurrent_requests():
    model = FakeRecurrentLM(VOCAB)
    prompts = [[1], [2, 3, 4], list(range(10, 60)), [9, 9]]

    async def main() -> list[list[RequestOutput]]:
        ae = make(model, slots=2, budget=8)
        await ae.start()
        try:
            params = SamplingParams(max_tokens=7, temperature=0.0)
            return await asyncio.gather(*(collect(ae, f"r{i}", p, params) for i, p in enumerate(prompts)))
        finally:
            await ae.shutdown()

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results):
        assert len(outs) == 7  # one streamed output per token
        assert [t for o in outs for t in o.new_token_ids] == greedy_generate(model, prompt, 7)
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        assert outs[-1].num_output_tokens == 7 and outs[-1].num_prompt_tokens == len(prompt)


def test_abort_close_and_cancel_free_the_slot():
    async def main() -> None:
        ae = make(FakeRecurrentLM(VOCAB), slots=3)
        await ae.start()
        # abort(): the stream ends with an ABORT output.
        outs = []
        async for o in ae.generate("a", [1, 2, 3], ENDLESS):
            outs.append(o)
            if len(outs) == 3:
                await ae.abort("a")
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
        await wait_until(lambda: ae.stats().slots_used == 0)
        # The consumer closes the generator early.
        gen = ae.generate("b", [4, 5], ENDLESS)
        async for o in gen:
            if o.num_output_tokens >= 2:
                break
        assert ae.stats().slots_used == 1
        await gen.aclose()
        await wait_until(lambda: ae.stats().slots_used == 0 and ae.stats().num_running == 0)

        # The consuming task is cancelled.
        async def consume() -> None:
            async for _ in ae.generate("c", [6], ENDLESS):
                pass

        task = asyncio.create_task(consume())
        await wait_until(lambda: ae.stats().slots_used == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: ae.stats().slots_used == 0 and ae.stats().num_running == 0)
        # Idle: the loop thread sleeps instead of stepping.
        steps = ae.stats().num_steps
        await asyncio.sleep(0.1)
        assert ae.stats().num_steps == steps
        await ae.shutdown()

    asyncio.run(main())


def test_input_errors_raise_before_any_output():
    async def main() -> None:
        ae = make(FakeRecurrentLM(VOCAB))
        await ae.start()
        assert ae.vocab_size == VOCAB and ae.max_model_len == 1000
        for bad in ([], [VOCAB + 3], [1] * 1001):
            gen = ae.generate("x", bad, SamplingParams())
            with pytest.raises(EngineInputError) as info:
                await gen.__anext__()
            assert info.value.param == "prompt"
        # The engine still serves afterwards.
        outs = await collect(ae, "ok", [1, 2], SamplingParams(max_tokens=2))
        assert outs[-1].finished
        await ae.shutdown()

    asyncio.run(main())


def test_step_exception_finishes_with_error_and_engine_keeps_serving():
    model = FakeRecurrentLM(VOCAB)

    async def main() -> None:
        ae = make(model)
        await ae.start()
        gen = ae.generate("a", [1, 2, 3], ENDLESS)
        first = await gen.__anext__()
        assert first.new_token_ids
        model.fail_with = RuntimeError("kernel exploded")
        rest = [o async for o in gen]
        assert rest[-1].finished and rest[-1].finish_reason is FinishReason.ERROR
        assert "kernel exploded" in (rest[-1].error or "")
        await wait_until(lambda: ae.stats().slots_used == 0)
        outs = await collect(ae, "b", [7, 8, 9], SamplingParams(max_tokens=4, temperature=0.0))
        assert [t for o in outs for t in o.new_token_ids] == greedy_generate(model, [7, 8, 9], 4)
        await ae.shutdown()

    asyncio.run(main())


def test_shutdown_ends_open_streams():
    async def main() -> None:
        ae = make(FakeRecurrentLM(VOCAB))
        await ae.start()
        gen = ae.generate("a", [1], ENDLESS)
        await gen.__anext__()
        await ae.shutdown()
        rest = [o async for o in gen]
        assert rest[-1].finished and rest[-1].finish_reason is FinishReason.ABORT
        assert ae.stats().slots_used == 0

    asyncio.run(main())


def test_serves_consumers_on_a_later_event_loop():
    ae = make(FakeRecurrentLM(VOCAB))
    params = SamplingParams(max_tokens=3, temperature=0.0)

    async def first() -> list[RequestOutput]:
        await ae.start()
        return await collect(ae, "a", [1, 2], params)

    async def second() -> list[RequestOutput]:
        outs = await collect(ae, "b", [1, 2], params)
        await ae.shutdown()
        return outs

    a, b = asyncio.run(first()), asyncio.run(second())
    assert [o.new_token_ids for o in a] == [o.new_token_ids for o in b] and b[-1].finished
