"""Quorum gates (``P2M_GATE_ARRIVE`` / ``M2P_GATE_DONE``): the master decides who is in a round.

Unit tests drive :class:`MasterState` through the list-wired harness of ``test_master_state``
with a fake clock (graces end at ``tick``); the end-to-end tests run a real master process and
real communicators over sockets.
"""

from __future__ import annotations

import threading
import time
import types
from typing import Any

import pytest
from pccl.master import state as state_mod
from test_master_state import FakeClock, Harness

import pccl
from pccl import messages as m
from pccl.messages import AbortKind, GateState, KickCode

A, R, W = int(GateState.ARRIVED), int(GateState.READY), int(GateState.WITHDRAW)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(
        state_mod, "time", types.SimpleNamespace(monotonic=c.monotonic, time=c.time)
    )
    return c


def arrive(h: Harness, pid: int, state: int, attempt: int, tag: int = 7, q: int = 2, g: int = 500):
    h.state.on_gate_arrive(pid, m.GateArrive(tag, attempt, state, q, g))


def dones(h: Harness) -> dict[int, m.GateDone]:
    out = {}
    for pid, msg in h.take(m.GateDone):
        assert isinstance(msg, m.GateDone)
        out[pid] = msg
    return out


def test_all_ready_decides_at_once(clock: FakeClock) -> None:
    h = Harness()
    a, b, c = h.admit(3)
    arrive(h, a, R, 1)
    arrive(h, b, R, 1)
    assert dones(h) == {}  # c has not arrived
    arrive(h, c, R, 1)
    d = dones(h)
    assert set(d) == {a, b, c} and all(x.ok for x in d.values())
    assert d[a].ready == [a, b, c] and d[a].members == h.ring()
    assert len({x.round_id for x in d.values()}) == 1 and d[a].round_id > 0
    assert not h.state.groups[0].gates


def test_quorum_waits_the_grace_then_decides_without_the_straggler(clock: FakeClock) -> None:
    h = Harness()
    a, b, c = h.admit(3)
    arrive(h, a, R, 1)
    arrive(h, b, R, 1)
    arrive(h, c, A, 1)  # present (its driver), still training
    assert dones(h) == {}
    clock.advance(0.4)
    h.state.tick(clock.now)
    assert dones(h) == {}  # 0.4 s < grace 0.5 s
    clock.advance(0.2)
    h.state.tick(clock.now)
    d = dones(h)
    assert set(d) == {a, b, c} and d[c].ready == [a, b] and d[c].ok
    # c's readiness after the decision is about a decided attempt: ignored, no new gate
    arrive(h, c, R, 1)
    assert dones(h) == {} and not h.state.groups[0].gates and not h.take_kicks()


def test_ready_within_the_grace_is_included(clock: FakeClock) -> None:
    h = Harness()
    a, b, c = h.admit(3)
    arrive(h, a, R, 1)
    arrive(h, b, R, 1)
    arrive(h, c, A, 1)
    clock.advance(0.3)
    arrive(h, c, R, 1)  # upgrade inside the grace: all ready, decided at once
    d = dones(h)
    assert d[a].ready == [a, b, c]


def test_grace_counts_from_the_quorum_not_from_arrival(clock: FakeClock) -> None:
    h = Harness()
    a, b, c = h.admit(3)
    arrive(h, a, A, 1)
    arrive(h, b, A, 1)
    arrive(h, c, A, 1)
    clock.advance(10)
    arrive(h, a, R, 1)
    arrive(h, b, R, 1)  # the quorum now: the grace starts here
    h.state.tick(clock.now)
    assert dones(h) == {}
    clock.advance(0.51)
    h.state.tick(clock.now)
    assert dones(h)[a].ready == [a, b]


def test_departure_and_new_epoch_abort_the_gate(clock: FakeClock) -> None:
    h = Harness()
    a, b, c = h.admit(3)
    arrive(h, a, R, 1)
    arrive(h, b, A, 1)
    h.drop(c)
    d = dones(h)
    assert set(d) == {a, b} and not any(x.ok for x in d.values())
    assert "left" in d[a].reason and d[a].kind == int(AbortKind.ABORTED)
    # the ring is broken until update_topology: arrivals are refused, not kicked
    arrive(h, a, R, 2)
    d = dones(h)
    assert d[a].kind == int(AbortKind.STALE_TOPOLOGY) and not h.take_kicks()
    h.vote(a, b)
    h.ready()
    h.take()
    arrive(h, a, R, 3)
    h.join()  # a newcomer registers; the vote of a and b starts an epoch: the gate is void
    h.vote(a, b)
    d = dones(h)
    assert d[a].kind == int(AbortKind.STALE_TOPOLOGY) and "topology changed" in d[a].reason


def test_mismatched_quorum_is_refused_naming_values(clock: FakeClock) -> None:
    h = Harness()
    a, b = h.admit(2)
    arrive(h, a, R, 1, q=2)
    arrive(h, b, R, 1, q=3)
    d = dones(h)
    assert d[a].kind == int(AbortKind.MISMATCH) and "min_quorum=3" in d[a].reason
    assert "min_quorum=2" in d[b].reason


def test_a_peer_that_never_arrives_times_the_gate_out(clock: FakeClock) -> None:
    h = Harness(config=pccl.Config(start_timeout_s=5))
    a, b, c = h.admit(3)
    arrive(h, a, R, 1)
    arrive(h, b, R, 1)
    clock.advance(6)
    h.state.tick(clock.now)
    d = dones(h)
    assert d[a].kind == int(AbortKind.START_TIMEOUT) and f"[{c}]" in d[a].reason


def test_withdraw_before_the_decision_and_untimely_words(clock: FakeClock) -> None:
    h = Harness()
    a, b = h.admit(2)
    arrive(h, a, R, 1)
    arrive(h, a, W, 1)
    d = dones(h)
    assert d[a].kind == int(AbortKind.WITHDRAWN) and not h.state.groups[0].gates
    arrive(h, a, W, 1)  # a second withdraw, a stale upgrade: ignored
    arrive(h, a, R, 1)
    assert dones(h) == {} and not h.take_kicks()
    arrive(h, a, R, 2)
    arrive(h, b, R, 1)
    assert dones(h)[b].ready == [a, b]
    arrive(h, a, R, 3)
    arrive(h, a, A, 4)  # another attempt while one is held: hostile
    assert h.take_kicks() == [(a, KickCode.OUT_OF_STATE)]


def test_two_tags_open_at_once_keep_their_attempts_live(clock: FakeClock) -> None:
    """A decision at one tag must not make the peer's held attempt at another tag stale."""
    h = Harness()
    a, b = h.admit(2)
    arrive(h, a, A, 1, tag=1)  # attempt 1 held at gate 1
    arrive(h, a, R, 2, tag=2)
    arrive(h, b, R, 1, tag=2)
    assert dones(h)[a].ready == [a, b]  # gate 2 decided: a's floor is now 2
    arrive(h, a, R, 1, tag=1)  # the upgrade of the still-held attempt 1 counts
    arrive(h, b, R, 2, tag=1)
    assert dones(h)[a].ready == [a, b] and not h.take_kicks()
    arrive(h, a, A, 3, tag=1)
    arrive(h, a, R, 4, tag=2)
    arrive(h, b, R, 3, tag=2)
    dones(h)
    arrive(h, a, W, 3, tag=1)  # and its withdraw is confirmed
    assert dones(h)[a].kind == int(AbortKind.WITHDRAWN) and not h.take_kicks()


def test_gates_of_groups_are_independent(clock: FakeClock) -> None:
    h = Harness()
    a, _ = h.admit(2, group=0)
    c, d = h.admit(2, group=1)
    arrive(h, a, R, 1)
    arrive(h, c, R, 1)
    arrive(h, d, R, 1)
    got = dones(h)
    assert set(got) == {c, d} and got[c].ready == [c, d]
    h.drop(d)
    assert dones(h) == {} and 7 in h.state.groups[0].gates


def test_pending_peer_is_refused(clock: FakeClock) -> None:
    h = Harness()
    h.admit(1)
    p = h.join()
    arrive(h, p, R, 1)
    assert dones(h)[p].kind == int(AbortKind.STALE_TOPOLOGY) and not h.take_kicks()


def test_gate_messages_round_trip_and_bounds() -> None:
    for msg in (
        m.GateArrive(3, 9, 1, 2, 250),
        m.GateDone(3, 9, 1 << 40, True, "", 0, [1, 2], [1, 2, 3]),
    ):
        raw = msg.encode()
        assert m.decode(msg.TYPE, raw[pccl.frame.HEADER.size :]) == msg
    for bad in (
        m.GateArrive(3, 9, 3, 2, 250),  # no such state
        m.GateArrive(3, 9, 1, 0, 250),  # quorum below 1
        m.GateArrive(3, 9, 1, 2, 3_600_001),
    ):
        with pytest.raises(pccl.ProtocolError):
            m.decode(bad.TYPE, bad.encode()[pccl.frame.HEADER.size :])


# ---------------------------------------------------------------------- real master


def _peers(master: Any, n: int) -> list[pccl.Communicator]:
    comms = [pccl.Communicator(master.address) for _ in range(n)]

    def start(c: pccl.Communicator) -> None:
        c.connect()  # a newcomer's connect returns once the incumbents admit it
        c.wait_for_world(n, 30)

    threads = [threading.Thread(target=start, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert all(c.group_world_size == n for c in comms)
    return comms


@pytest.mark.timeout(60)
def test_real_master_decides_quorum_and_includes_late_readiness_in_grace(master: Any) -> None:
    comms = _peers(master, 3)
    try:
        # all ready at once: all three in
        hs = [c.quorum_gate_async(1, ready=True, min_quorum=2, grace_s=0.3) for c in comms]
        rs = [h.wait(10) for h in hs]
        assert all(r.ready == rs[0].ready for r in rs) and len(rs[0].ready) == 3
        assert all(r.included for r in rs) and len({r.round_id for r in rs}) == 1
        # two ready, the third marks ready only after the grace: decided without it
        hs = [
            c.quorum_gate_async(1, ready=i < 2, min_quorum=2, grace_s=0.3)
            for i, c in enumerate(comms)
        ]
        t0 = time.monotonic()
        assert hs[2].wait_done(5)
        waited = time.monotonic() - t0
        hs[2].mark_ready()  # too late: the decision was made
        rs = [h.wait(10) for h in hs]
        assert rs[2].ready == rs[0].ready and len(rs[0].ready) == 2 and not rs[2].included
        assert comms[2].peer_id not in rs[0].ready
        assert 0.25 <= waited < 3.0, waited  # the grace, then the master's timer
        # the third marks ready inside the grace: included
        hs = [
            c.quorum_gate_async(1, ready=i < 2, min_quorum=2, grace_s=2.0)
            for i, c in enumerate(comms)
        ]
        time.sleep(0.2)
        hs[2].mark_ready()
        rs = [h.wait(10) for h in hs]
        assert len(rs[0].ready) == 3 and rs[2].included
        # a local timeout withdraws and is retryable
        h = comms[0].quorum_gate_async(2, ready=True, min_quorum=3)
        with pytest.raises(pccl.CollectiveAborted, match="timed out locally"):
            h.wait(0.3)
        with pytest.raises(pccl.CollectiveAborted, match="withdrawn"):
            h.wait(0.3)  # waiting again says what happened (not CancelledError)
        with pytest.raises(ValueError, match="grace_s"):
            comms[0].quorum_gate_async(3, min_quorum=2, grace_s=True)  # type: ignore[arg-type]
    finally:
        for c in comms:
            c.close()


def test_gate_before_connect_is_refused_not_lost(master: Any) -> None:
    c = pccl.Communicator(master.address)
    try:
        with pytest.raises(RuntimeError, match="connect"):  # as all_reduce before connect
            c.quorum_gate_async(1, ready=True, min_quorum=1)
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_real_master_a_departure_aborts_the_gate_then_it_reforms(master: Any) -> None:
    comms = _peers(master, 3)
    try:
        hs = [c.quorum_gate_async(5, ready=True, min_quorum=3) for c in comms[:2]]
        time.sleep(0.2)
        comms[2].close()  # leaves while the others wait for it
        for h in hs:
            with pytest.raises(pccl.CollectiveAborted, match="left"):
                h.wait(10)
        ts = [threading.Thread(target=c.update_topology) for c in comms[:2]]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        hs = [c.quorum_gate_async(5, ready=True, min_quorum=3) for c in comms[:2]]
        rs = [h.wait(10) for h in hs]
        assert len(rs[0].ready) == 2 and rs[0].members == rs[1].members  # quorum capped at 2
    finally:
        for c in comms:
            c.close()
