import pytest
import torch

from rnnserve.config import ConfigError, StatePoolConfig
from rnnserve.engine.state_pool import PAD_SLOT, StatePool
from rnnserve.models.base import StateSpec

SPECS = [
    [StateSpec("conv", (6, 3), torch.bfloat16), StateSpec("ssm", (6, 4), torch.float32)],
    [StateSpec("pp", (5,), torch.float32, fill=-1e30), StateSpec("ssm", (6, 4), torch.float32)],
]
BYTES = 6 * 3 * 2 + 6 * 4 * 4 + 5 * 4 + 6 * 4 * 4  # 248


def test_bytes_per_slot_and_shapes():
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=3), "cpu")
    assert pool.bytes_per_slot == BYTES
    assert pool.capacity == 3 and pool.num_slots == 4
    assert pool.states[0]["conv"].shape == (4, 6, 3) and pool.states[0]["conv"].dtype == torch.bfloat16
    assert pool.states[1]["pp"].shape == (4, 5)
    assert torch.all(pool.states[1]["pp"] == -1e30)


def test_capacity_from_state_memory():
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=100, state_memory=BYTES * 5 + 17), "cpu")
    assert pool.capacity == 5 and pool.num_slots == 6
    # The budget caps the pool; it never grows it past the sequences the scheduler may run.
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=3, state_memory=BYTES * 5 + 17), "cpu")
    assert pool.capacity == 3 and pool.num_slots == 4
    with pytest.raises(ConfigError, match="holds no sequence"):
        StatePool(SPECS, StatePoolConfig(state_memory=BYTES - 1), "cpu")


def test_alloc_never_hands_out_slot_zero_and_runs_out():
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=4), "cpu")
    slots = [pool.alloc() for _ in range(4)]
    assert sorted(slots) == [1, 2, 3, 4] and PAD_SLOT not in slots
    assert pool.alloc() is None
    assert pool.num_free == 0 and pool.usage == 1.0
    pool.free(slots[2])
    assert pool.usage == 0.75
    assert pool.alloc() == slots[2]
    with pytest.raises(ValueError):
        pool.free(PAD_SLOT)
    pool.free(slots[0])
    with pytest.raises(ValueError):
        pool.free(slots[0])


def test_alloc_resets_and_reset_uses_fill_values():
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=2), "cpu")
    slot = pool.alloc()
    for layer in pool.states:
        for t in layer.values():
            t[slot] = 7
    pool.reset(slot)
    assert torch.all(pool.states[0]["ssm"][slot] == 0)
    assert torch.all(pool.states[1]["pp"][slot] == -1e30)
    for layer in pool.states:
        for t in layer.values():
            t[slot] = 7
    pool.free(slot)
    again = pool.alloc()
    assert again == slot
    assert torch.all(pool.states[0]["conv"][slot] == 0)
    assert torch.all(pool.states[1]["pp"][slot] == -1e30)


def test_copy_snapshot_restore():
    pool = StatePool(SPECS, StatePoolConfig(max_num_seqs=3), "cpu")
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    for layer in pool.states:
        for t in layer.values():
            t[a] = torch.randn(t[a].shape).to(t.dtype)
    pool.copy(a, b)
    for layer in pool.states:
        for t in layer.values():
            assert torch.equal(t[a], t[b])
            assert not torch.equal(t[a], t[c])
    snap = pool.snapshot(a)
    assert snap[0]["conv"].device.type == "cpu" and snap[0]["conv"].dtype == torch.bfloat16
    before = [{k: v.clone() for k, v in s.items()} for s in snap]
    for layer in pool.states:
        for t in layer.values():
            t[a] = 0
    # The snapshot is a copy: overwriting the slot does not change it.
    assert all(torch.equal(before[i][k], snap[i][k]) for i in range(2) for k in snap[i])
    pool.restore(c, snap)
    for layer, saved in zip(pool.states, before):
        for k, t in layer.items():
            assert torch.equal(t[c], saved[k])
