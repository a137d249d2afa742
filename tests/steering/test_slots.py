import asyncio

import pytest

from steering.worker.slots import SlotAllocator, SlotGate, SlotsBusy, SlotsExhausted


def test_allocator_shares_revives_and_exhausts():
    a = SlotAllocator(2)
    s1, w1 = a.acquire("r1", "A")
    s2, w2 = a.acquire("r2", "A")
    assert s1 == s2 and w1 and not w2
    s3, w3 = a.acquire("r3", "B")
    assert s3 != s1 and w3
    with pytest.raises(SlotsExhausted):
        a.acquire("r4", "C")
    a.release("r1")
    a.release("r2")
    assert a.busy == 1
    # A comes back before its slot is reused: no rewrite
    s5, w5 = a.acquire("r5", "A")
    assert s5 == s1 and not w5
    a.release("r5")
    s6, w6 = a.acquire("r6", "C")
    assert s6 == s1 and w6
    a.release("unknown")  # harmless
    assert a.acquire("r6", "C") == (s6, False)


async def test_gate_waits_for_a_free_slot_and_shares_keys():
    gate = SlotGate(2)
    order = []
    release_a = asyncio.Event()

    async def hold(key, tag, until=None):
        async with gate.hold(key):
            order.append(f"in {tag}")
            if until is not None:
                await until.wait()
        order.append(f"out {tag}")

    ta = asyncio.create_task(hold("A", "a", release_a))
    tb = asyncio.create_task(hold("B", "b", asyncio.Event()))
    await asyncio.sleep(0.01)
    tc = asyncio.create_task(hold("C", "c"))
    ta2 = asyncio.create_task(hold("A", "a2"))  # shares A's slot: no wait
    tn = asyncio.create_task(hold(None, "none"))
    await asyncio.sleep(0.01)
    assert "in c" not in order and "in a2" in order and "in none" in order
    assert gate.waiting == 1 and gate.resident == 2
    release_a.set()
    await asyncio.wait_for(asyncio.gather(ta, ta2, tc, tn), 1)
    assert "in c" in order and gate.waiting == 0
    tb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tb
    assert gate.resident == 0


async def test_gate_cancelled_waiter_does_not_leak():
    gate = SlotGate(1)
    hold_a = asyncio.Event()

    async def holder():
        async with gate.hold("A"):
            await hold_a.wait()

    t = asyncio.create_task(holder())
    await asyncio.sleep(0.01)

    async def waiter():
        async with gate.hold("B"):
            pass

    w = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert gate.waiting == 0 and gate.resident == 1
    hold_a.set()
    await t
    assert gate.resident == 0


# -- the bounded queue (issue 16) ---------------------------------------------------------------
async def test_gate_queue_full_is_refused_at_once():
    gate = SlotGate(1, max_waiters=1)
    a = await gate.acquire("A")
    waiter = asyncio.create_task(gate.acquire("B"))
    await asyncio.sleep(0.01)
    assert gate.waiting == 1
    with pytest.raises(SlotsBusy) as busy:
        await gate.acquire("C")
    assert busy.value.reason == "queue_full" and busy.value.retry_after >= 1
    assert gate.rejected == {"queue_full": 1, "timeout": 0}
    shared = await asyncio.wait_for(gate.acquire("A"), 0.1)  # a resident key never queues
    a.release()
    shared.release()
    b = await asyncio.wait_for(waiter, 1)
    assert b.key == "B" and gate.resident == 1 and gate.waiting == 0
    b.release()
    assert gate.resident == 0


async def test_gate_wait_times_out_and_leaves_nothing_behind():
    gate = SlotGate(1, queue_timeout=0.05)
    a = await gate.acquire("A")
    with pytest.raises(SlotsBusy) as busy:
        await gate.acquire("B")
    assert busy.value.reason == "timeout" and gate.rejected["timeout"] == 1
    assert gate.waiting == 0 and gate.resident == 1
    a.release()
    a.release()  # idempotent: a second release changes nothing
    assert gate.resident == 0
    assert (await gate.acquire("B")).key == "B"


async def test_gate_zero_timeout_never_waits():
    gate = SlotGate(1, queue_timeout=0)
    await gate.acquire("A")
    with pytest.raises(SlotsBusy, match="busy"):
        await gate.acquire("B")
    assert gate.waiting == 0


async def test_gate_hands_slots_over_in_arrival_order():
    gate = SlotGate(1)
    a = await gate.acquire("A")
    order = []

    async def take(key):
        lease = await gate.acquire(key)
        order.append(key)
        return lease

    tb = asyncio.create_task(take("B"))
    await asyncio.sleep(0.01)
    tc = asyncio.create_task(take("C"))
    await asyncio.sleep(0.01)
    a.release()
    b = await asyncio.wait_for(tb, 1)
    assert order == ["B"] and not tc.done()
    b.release()
    (await asyncio.wait_for(tc, 1)).release()
    assert order == ["B", "C"] and gate.resident == 0


async def test_gate_waiter_cancelled_after_handover_does_not_leak():
    gate = SlotGate(1)
    a = await gate.acquire("A")
    tb = asyncio.create_task(gate.acquire("B"))
    await asyncio.sleep(0.01)
    a.release()  # hands the slot to B's future...
    tb.cancel()  # ...but B's task is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await tb
    assert gate.resident == 0 and gate.waiting == 0


async def test_gate_default_waiters_are_four_per_slot():
    assert SlotGate(16).max_waiters == 64
    assert SlotGate(2, max_waiters=0).max_waiters == 0


def test_allocator_evict_forgets_the_configuration():
    a = SlotAllocator(1)
    slot, fresh = a.acquire("r1", "A")
    a.evict("r1")
    assert a.busy == 0
    assert a.acquire("r2", "A") == (slot, True)  # tables are written again
