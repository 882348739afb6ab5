"""The prefix cache folder's background writer: jobs run in order, writes past the bound are refused
rather than waited for, deletes never are; an engine whose disk is stalled keeps stepping, and once
the disk moves on (``flush``) the folder holds exactly the live entries, which a restart loads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rnnserve.config import PrefixCacheConfig
from rnnserve.engine import SamplingParams
from rnnserve.engine import prefix_cache as prefix_cache_module
from rnnserve.engine.cache_writer import CacheWriter
from tests.engine.fake_model import FakeRecurrentLM
from tests.engine.test_engine import drain, tokens
from tests.engine.test_prefix_cache import VOCAB, make_engine, prompt_of

WAIT_S = 60  # only bounds a broken run; nothing waits this long when the code is right


def test_jobs_run_in_order_and_writes_past_the_bound_are_refused(tmp_path: Path) -> None:
    writer = CacheWriter(max_pending_writes=2)
    entered, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> None:
        entered.set()
        assert release.wait(WAIT_S)
        ran.append("slow")

    doomed = tmp_path / "doomed"
    doomed.write_text("x")
    assert writer.write(tmp_path / "a", slow)
    assert entered.wait(WAIT_S)
    assert writer.write(tmp_path / "b", lambda: ran.append("b"))
    assert not writer.write(tmp_path / "c", lambda: ran.append("c"))  # two writes wait already
    assert writer.dropped == 1
    writer.delete(doomed)  # never refused
    assert not writer.write(tmp_path / "d", lambda: ran.append("d"))  # a delete frees no write's place
    release.set()
    writer.flush()
    assert ran == ["slow", "b"] and not doomed.exists() and writer.pending_writes == 0
    assert writer.write(tmp_path / "e", lambda: ran.append("e"))
    writer.flush()
    assert ran == ["slow", "b", "e"]
    with pytest.raises(ValueError):
        CacheWriter(max_pending_writes=0)


def test_a_stalled_disk_does_not_stop_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    save = prefix_cache_module.save_state_file

    def stalled_save(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(WAIT_S)
        save(*args, **kwargs)

    monkeypatch.setattr(prefix_cache_module, "save_state_file", stalled_save)
    model = FakeRecurrentLM(VOCAB)
    folder = tmp_path / "cache"
    probe = make_engine(model, None)
    per_state = probe.pool.bytes_per_slot
    # Room for 2 snapshots on the device and 3 on the host: the run below evicts while writes wait.
    cfg = PrefixCacheConfig(
        interval=1000, device_memory=2 * per_state, host_memory=3 * per_state, cache_dir=str(folder)
    )
    engine = make_engine(model, cfg)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    history: list[int] = []
    for turn in range(6):  # every turn inserts its prompt and its answer
        history += prompt_of(5, 40 + turn)
        engine.add_request(f"t{turn}", history, greedy)
        history += tokens(drain(engine)[f"t{turn}"])
    # Every step ran while the first write could not finish. On a busy machine the writer thread may
    # not have reached that write yet when the steps end, so wait for it to enter rather than poll.
    assert entered.wait(WAIT_S) and not release.is_set()
    assert engine.prefix_cache.evictions > 0
    assert not list(folder.glob("*.safetensors"))
    release.set()
    engine.flush()
    cache = engine.prefix_cache
    live = {e.file for tier in cache._tiers.values() for e in tier.values() if e.file is not None}
    assert live and set(folder.glob("*.safetensors")) == live  # evicted entries' files are gone
    restarted = make_engine(model, cfg)
    assert len(restarted.prefix_cache) == min(len(live), 3)  # a restart loads into the host tier
    restarted.add_request("next", history, greedy)
    assert drain(restarted)["next"][-1].num_cached_tokens > 0


def test_shutdown_waits_for_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AsyncEngine.shutdown (the server's shutdown and drain) returns once the pending writes are done."""
    import asyncio

    from rnnserve.engine import AsyncEngine

    release = threading.Event()
    save = prefix_cache_module.save_state_file

    def slow_save(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        assert release.wait(WAIT_S)
        save(*args, **kwargs)

    monkeypatch.setattr(prefix_cache_module, "save_state_file", slow_save)
    folder = tmp_path / "cache"
    engine = AsyncEngine(make_engine(FakeRecurrentLM(VOCAB), PrefixCacheConfig(interval=1000, cache_dir=str(folder))))

    async def serve_one() -> None:
        async for out in engine.generate("r", prompt_of(8, 60), SamplingParams(max_tokens=3, ignore_eos=True)):
            if out.finished:
                break
        assert not list(folder.glob("*.safetensors"))  # finished while its snapshots wait for the disk
        shutdown = asyncio.ensure_future(engine.shutdown())
        done, _ = await asyncio.wait({shutdown}, timeout=0.5)
        assert not done  # it waits for the disk (with the disk stuck it cannot be done, however long)
        release.set()
        await shutdown
        assert len(list(folder.glob("*.safetensors"))) == 2  # the prompt's and the answer's

    asyncio.run(serve_one())
