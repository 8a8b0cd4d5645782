"""``optimize_topology()`` end to end: the real master daemon and real peer processes.

On loopback every link is alike, so the solver's order is decided by measurement noise: the
test takes any different order (``min_gain=-1``, calling again until one is taken) and checks
that every peer ends in the same new ring, agrees on every decision, and the all-reduces before
and after the re-wiring are exact and bit-identical on every peer. A departure during the vote gives
the others a retryable ``TopologyUpdateFailed`` (never a hang), after which the group re-forms
and reduces. (Re-ordering to a known best ring is covered by tests/test_optimize_state.py and,
on heterogeneous links, by the WAN testbed in tests/test_netns.py.)
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_group_agrees_on_the_optimised_ring_and_keeps_bit_parity(master, workers) -> None:
    world = 4
    ws = [
        workers.spawn(
            "optimize.py",
            master,
            {"idx": i, "world": world, "n": 300_000, "min_gain": -1.0, "reprobe": True, "tries": 8},
        )
        for i in range(world)
    ]
    res = workers.wait_exit(ws, timeout=100)
    before = [ev for w in ws for ev in w.events if ev.get("event") == "before"]
    ids = sorted(ev["peer_id"] for ev in before)
    assert len({ev["digest"] for ev in before}) == 1
    rings = {tuple(r["ring"]) for r in res.values()}
    assert len(rings) == 1 and sorted(rings.pop()) == ids
    assert len({(r["rewired"], r["tries"]) for r in res.values()}) == 1  # same decisions
    # Any order differing from the current one is taken (min_gain=-1); with noisy, alike
    # links the solver picks the current one about once in 6, so 8 tries re-order but for a
    # chance of 6**-8.
    assert all(r["rewired"] for r in res.values())
    assert len({r["digest"] for r in res.values()}) == 1  # bit parity across the re-wiring
    assert all(r["links"] == world - 1 for r in res.values())  # probed every other peer
    assert "probing 6 links of 4 peers in 3 rounds" in master.log_tail()


def test_a_departure_during_the_vote_is_a_retryable_error_not_a_hang(master, workers) -> None:
    world = 3
    base = {"world": world, "n": 100_000, "min_gain": 0.1, "reprobe": True, "victim_idx": 2}
    ws = [
        workers.spawn("optimize.py", master, {**base, "idx": i, "victim": i == 2})
        for i in range(world)
    ]
    res = workers.wait_exit(ws[:2], timeout=100)
    failed = [ev for w in ws[:2] for ev in w.events if ev.get("event") == "optimize_failed"]
    assert len(failed) == 2
    assert all(ev["retryable"] for ev in failed)
    assert all(ev["s"] < 30 for ev in failed)
    assert all(r["failed"] for r in res.values())
    assert len({r["digest"] for r in res.values()}) == 1


def test_auto_optimize_orders_the_ring_while_admitting(master_factory, workers) -> None:
    master = master_factory(PCCL_AUTO_OPTIMIZE_TOPOLOGY="1")
    world = 3
    ws = [
        workers.spawn(
            "optimize.py",
            master,
            {
                "idx": i,
                "world": world,
                "n": 100_000,
                "min_gain": 0.1,
                "reprobe": False,
                "auto": True,
            },
        )
        for i in range(world)
    ]
    res = workers.wait_exit(ws, timeout=100)
    assert len({tuple(r["ring"]) for r in res.values()}) == 1
    assert len({r["digest"] for r in res.values()}) == 1
    # The update that admitted the third peer probed every pair first (3 links, 3 rounds).
    assert "probing 3 links of 3 peers in 3 rounds" in master.log_tail()
    assert all(r["probed"] >= 1 and r["links"] == world - 1 for r in res.values())
