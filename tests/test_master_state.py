"""``pccl.master.state.MasterState`` without sockets.

The state machine talks only through its two callbacks; here they append to lists, so each test
drives a scenario event by event and asserts exactly which message reached which peer. Covers
admission (first peer at once, newcomers by unanimous vote, departed voters completing votes),
epoch set-up (ready/done, unreachable reports), collective votes and verdicts (each peer's own
attempt number echoed back), withdraws, the master-side start and vote deadlines (driven by
``tick(now)`` with a chosen ``now``, or a module-local fake clock), the verdict memory and its
query, untimely messages answered instead of kicked, ring order, the isolation of peer groups,
and restart safety with a :class:`~pccl.master.store.RunStore` on a temporary file.
"""

from __future__ import annotations

import dataclasses
import time
import types
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pccl.master import state as state_mod
from pccl.master.state import VERDICT_MEMORY, GroupState, MasterState, Phase
from pccl.master.store import RunStore

from pccl import messages as m
from pccl.config import Config
from pccl.errors import ProtocolError
from pccl.frame import HEADER, PROTOCOL_VERSION, MsgType
from pccl.messages import AbortKind, KickCode, Outcome, VerdictState

pytestmark = pytest.mark.timeout(30)

PARAMS = dict(count=1024, dtype=0, op=0, quant=0)
OK = int(AbortKind.OK)
STALE = int(AbortKind.STALE_TOPOLOGY)


class Harness:
    """A MasterState wired to lists. ``kick`` only records, like a daemon whose connection has
    not closed yet; :meth:`drop` then simulates the disconnect the daemon reports later.

    Every peer numbers its collective attempts from its own base (``100 * peer id``), so a
    verdict carrying another peer's attempt number would not compare equal."""

    def __init__(
        self,
        config: Config | None = None,
        store: RunStore | None = None,
        restart_grace_s: float | None = None,
    ) -> None:
        self.sent: list[tuple[int, m.Message]] = []
        self.kicks: list[tuple[int, KickCode, str]] = []
        self._checked: dict[int, m.Message] = {}
        self.attempts: dict[tuple[int, int], int] = {}  # (peer, tag) -> its latest attempt
        self._next_attempt: dict[int, int] = {}
        self.state = MasterState(
            self._send, self._kick, config, store, restart_grace_s=restart_grace_s
        )

    def _send(self, pid: int, msg: m.Message) -> None:
        # Whatever the master emits must survive the wire: peers decode it with the same schema
        # and drop the master link on a ProtocolError.
        if id(msg) not in self._checked:
            raw = msg.encode()
            try:
                back = m.decode(msg.TYPE, raw[HEADER.size :])
            except ProtocolError as e:
                raise AssertionError(f"master emitted an undecodable {msg.TYPE.name}: {e}") from e
            assert back == msg
            self._checked[id(msg)] = msg  # keeps msg alive so its id is not reused
        self.sent.append((pid, msg))

    def _kick(self, pid: int, code: KickCode, reason: str) -> None:
        assert isinstance(code, KickCode), code
        self.kicks.append((pid, code, reason))

    # -------------------------------------------------------------- driving

    def join(self, group: int = 0) -> int:
        pid = self.state.new_peer_id()
        self.state.register(pid, group, f"10.0.0.{pid}", 40000 + pid % 20000)
        return pid

    def ready(self, *pids: int, epoch: int | None = None) -> None:
        """``pids`` (default: every peer in an epoch) report their group's epoch wired."""
        for pid in pids or self.in_epoch():
            e = self.group_of(pid).epoch if epoch is None else epoch
            self.state.on_topology_ready(pid, m.TopologyReady(e, True))

    def group_of(self, pid: int) -> GroupState:
        return self.state.groups[self.state.peers[pid].group]

    def in_epoch(self) -> list[int]:
        return [p.peer_id for p in self.state.peers.values() if p.in_epoch]

    def vote(self, *pids: int) -> None:
        for pid in pids:
            self.state.on_update_topology(pid)

    def drop(self, pid: int, reason: str = "disconnected") -> None:
        self.state.remove(pid, reason)

    def initiate(self, pid: int, tag: int = 0, attempt: int | None = None, **kw: Any) -> int:
        """Initiate ``tag`` as ``pid``'s next attempt (or ``attempt``); returns the attempt."""
        if attempt is None:
            attempt = self._next_attempt.get(pid, 100 * pid + 1)
            self._next_attempt[pid] = attempt + 1
        self.attempts[(pid, tag)] = attempt
        self.state.on_initiate(pid, m.CollectiveInitiate(tag, attempt, **{**PARAMS, **kw}))
        return attempt

    def withdraw(self, pid: int, tag: int, attempt: int | None = None, reason: str = "") -> None:
        a = self.attempts[(pid, tag)] if attempt is None else attempt
        self.state.on_withdraw(pid, m.CollectiveWithdraw(tag, a, reason))

    def complete(self, pid: int, tag: int, op_id: int, ok: bool = True, reason: str = "") -> None:
        self.state.on_complete(pid, m.CollectiveComplete(tag, op_id, ok, reason))

    def query(self, pid: int, op_id: int) -> m.Verdict:
        self.state.on_verdict_query(pid, m.VerdictQuery(op_id))
        ((to, v),) = self.take(m.Verdict)
        assert to == pid and isinstance(v, m.Verdict) and v.op_id == op_id
        return v

    def admit(self, n: int, group: int = 0) -> list[int]:
        """Bring ``n`` new peers of ``group`` into the run (votes from everyone accepted)."""
        pids = []
        for _ in range(n):
            pid = self.join(group)
            pids.append(pid)
            if self.state.groups[group].phase is Phase.CONNECTING:
                self.ready()
            else:
                self.vote(*[p.peer_id for p in self.state.accepted if p.group == group])
                self.ready()
        assert all(self.state.peers[p].accepted for p in pids)
        self.take()
        return pids

    def run_op(self, pids: list[int], tag: int = 0) -> int:
        """One successful collective of ``pids`` on ``tag``; returns its op id."""
        for p in pids:
            self.initiate(p, tag)
        go = self.take(m.CollectiveCommence)
        assert sorted(to for to, _ in go) == sorted(pids)
        op_id = go[0][1].op_id  # type: ignore[attr-defined]
        for p in pids:
            self.complete(p, tag, op_id)
        assert len(self.take(m.CollectiveDone)) == len(pids)
        return op_id

    # -------------------------------------------------------------- expecting

    def done(
        self, pid: int, tag: int, op_id: int, ok: bool, reason: str = "", kind: int = OK
    ) -> m.CollectiveDone:
        """The verdict ``pid`` must get for its latest attempt of ``tag``."""
        return m.CollectiveDone(tag, self.attempts[(pid, tag)], op_id, ok, reason, int(kind))

    def commence(self, pid: int, tag: int, op_id: int) -> m.CollectiveCommence:
        e = self.group_of(pid).epoch
        return m.CollectiveCommence(tag, self.attempts[(pid, tag)], op_id, e)

    # -------------------------------------------------------------- inspecting

    def take(self, kind: type[m.Message] | None = None) -> list[tuple[int, m.Message]]:
        """Remove and return what was sent (of ``kind``), in order."""
        out = [(p, x) for p, x in self.sent if kind is None or isinstance(x, kind)]
        self.sent = [(p, x) for p, x in self.sent if not (kind is None or isinstance(x, kind))]
        return out

    def take_kicks(self) -> list[tuple[int, KickCode]]:
        out = [(p, c) for p, c, _ in self.kicks]
        self.kicks.clear()
        return out

    def ring(self, group: int = 0) -> list[int]:
        return list(self.state.groups[group].ring)


def ring_ids(t: m.Topology) -> list[int]:
    return [pid for pid, _, _ in t.ring]


class FakeClock:
    """``time`` as :mod:`pccl.master.state` sees it: ``monotonic()`` only moves when told."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.time = time.time  # the wall clock only seeds epoch and op ids

    def monotonic(self) -> float:
        return self.now

    def advance(self, s: float) -> float:
        self.now += s
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(
        state_mod, "time", types.SimpleNamespace(monotonic=c.monotonic, time=c.time)
    )
    return c


# --------------------------------------------------------------------------- admission


def test_first_peer_is_admitted_at_once() -> None:
    h = Harness()
    p1 = h.join()
    assert h.state.phase is Phase.CONNECTING
    ((to, topo),) = h.take()
    assert to == p1
    e = h.state.epoch  # epochs start from a wall-clock base (monotonic across restarts)
    assert topo == m.Topology(e, 1, 1, 1, [(p1, "10.0.0.1", 40001)])
    assert not h.state.peers[p1].accepted  # accepted once its links are up
    h.ready(p1)
    assert h.take() == [(p1, m.TopologyDone(e, True))]
    assert h.state.peers[p1].accepted
    assert h.state.phase is Phase.IDLE
    assert h.kicks == []


def test_newcomers_wait_for_every_accepted_peer_to_vote() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    p3 = h.join()
    p4 = h.join()
    assert h.take() == []  # pending: no topology for anyone
    assert [p.peer_id for p in h.state.pending] == [p3, p4]
    h.vote(p1)
    assert h.take() == [] and h.state.phase is Phase.IDLE
    h.vote(p2)
    sent = h.take(m.Topology)
    assert sorted(to for to, _ in sent) == [p1, p2, p3, p4]
    epoch = h.state.epoch
    assert {t.epoch for _, t in sent} == {epoch}
    assert all(ring_ids(t) == [p1, p2, p3, p4] and t.world_size == 4 for _, t in sent)
    h.ready(p1, p2, p3)
    assert h.take() == []  # p4 not ready yet
    assert not h.state.peers[p4].accepted
    h.ready(p4)
    done = h.take()
    assert sorted(to for to, _ in done) == [p1, p2, p3, p4]
    assert all(x == m.TopologyDone(epoch, True) for _, x in done)
    assert all(h.state.peers[p].accepted for p in (p3, p4))


def test_vote_without_newcomers_still_rewires() -> None:
    """update_topology is a barrier even when nobody waits: a new epoch is announced."""
    h = Harness()
    p1, p2 = h.admit(2)
    e = h.state.epoch
    h.vote(p1, p2)
    assert h.state.epoch == e + 1
    assert sorted(to for to, _ in h.take(m.Topology)) == [p1, p2]
    h.ready()
    assert len(h.take(m.TopologyDone)) == 2


def test_departed_voter_completes_the_vote() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    p4 = h.join()
    h.vote(p1, p2)
    assert h.take() == []
    h.drop(p3)  # the last non-voter leaves: its departure completes the vote
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == [p1, p2, p4]
    assert all(ring_ids(t) == [p1, p2, p4] for _, t in topo)
    h.ready()
    assert h.state.peers[p4].accepted


def test_departed_voter_never_blocks_a_vote() -> None:
    """A peer that voted and then left is not waited for, and its vote does not linger."""
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.vote(p3)
    h.drop(p3)
    assert h.take() == []
    h.vote(p1, p2)
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == [p1, p2]
    assert all(ring_ids(t) == [p1, p2] for _, t in topo)


def test_peer_registering_during_setup_waits_for_the_next_vote() -> None:
    h = Harness()
    p1 = h.join()  # epoch 1 announced, not ready yet
    p2 = h.join()
    assert [to for to, _ in h.take(m.Topology)] == [p1]  # p2 is not in epoch 1
    h.ready(p1)
    assert h.take() == [(p1, m.TopologyDone(h.state.epoch, True))]
    assert not h.state.peers[p2].accepted
    h.vote(p1)
    assert ring_ids(h.take(m.Topology)[0][1]) == [p1, p2]


def test_pending_peer_leaving_changes_nothing() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    p3 = h.join()
    h.drop(p3)
    assert h.take() == []
    assert h.state.phase is Phase.IDLE
    assert not h.state.groups[0].broken
    h.initiate(p1)
    h.initiate(p2)
    assert len(h.take(m.CollectiveCommence)) == 2


def test_untimely_update_votes_are_answered_not_kicked() -> None:
    """A vote during the set-up of the voter's own epoch is answered by that epoch's
    completion; a pending peer's vote is refused (``TopologyDone(ok=False)``) and not counted."""
    h = Harness()
    p1 = h.join()
    h.take()
    e = h.state.epoch
    h.vote(p1)  # not accepted yet (its first epoch is still connecting)
    assert h.take() == [] and h.kicks == []
    assert h.state.epoch == e and h.state.phase is Phase.CONNECTING
    h.ready(p1)
    assert h.take() == [(p1, m.TopologyDone(e, True))]  # this answers the vote
    p2 = h.join()
    h.vote(p2)  # pending peers do not vote
    ((to, refusal),) = h.take()
    assert to == p2 and isinstance(refusal, m.TopologyDone)
    assert (refusal.epoch, refusal.ok) == (e, False)
    assert "not accepted" in refusal.reason
    assert h.kicks == [] and p2 in h.state.peers
    assert not h.state.peers[p2].voted_update
    h.vote(p1)  # the only accepted peer votes: p2 is admitted as usual
    assert sorted(to for to, _ in h.take(m.Topology)) == [p1, p2]
    h.ready()
    assert h.state.peers[p2].accepted and h.kicks == []


def test_untimely_update_vote_during_a_foreign_setup_is_refused_not_kicked() -> None:
    """A peer registered while an epoch is being set up is outside it: its vote is refused."""
    h = Harness()
    p1 = h.join()
    p2 = h.join()
    h.take()
    h.vote(p2)
    assert h.state.phase is Phase.CONNECTING
    ((to, refusal),) = h.take()
    assert to == p2 and isinstance(refusal, m.TopologyDone) and not refusal.ok
    assert h.kicks == []
    h.ready(p1)
    assert h.take() == [(p1, m.TopologyDone(h.state.epoch, True))]
    assert not h.state.peers[p2].accepted


def test_update_vote_with_collective_outstanding_is_refused_not_kicked() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    e = h.state.epoch
    h.initiate(p1, tag=3)
    h.vote(p1)
    ((to, refusal),) = h.take()
    assert to == p1 and isinstance(refusal, m.TopologyDone)
    assert (refusal.epoch, refusal.ok) == (e, False)
    assert "outstanding" in refusal.reason and "3" in refusal.reason
    assert h.kicks == []
    h.vote(p2)  # the refused vote was not counted: p2's vote alone changes nothing
    assert h.take() == [] and h.state.epoch == e and h.state.phase is Phase.IDLE
    # The collective still runs, and once it is decided p1's vote completes the update.
    h.initiate(p2, tag=3)
    go = h.take(m.CollectiveCommence)
    assert sorted(to for to, _ in go) == [p1, p2]
    op_id = go[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p1, 3, op_id)
    h.complete(p2, 3, op_id)
    assert len(h.take(m.CollectiveDone)) == 2
    h.vote(p1)
    assert sorted(to for to, _ in h.take(m.Topology)) == [p1, p2]
    assert h.kicks == []


# --------------------------------------------------------------------------- epoch set-up


def test_stale_and_foreign_topology_reports() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    e = h.state.epoch
    h.vote(p1, p2)
    h.take()
    h.ready(p1, p2, epoch=e)  # a report for the previous epoch is ignored
    assert h.take() == [] and h.state.phase is Phase.CONNECTING
    p3 = h.join()  # registered after the announcement: outside the epoch
    h.ready(p3)  # an untimely report: ignored, not fatal, and it does not count
    assert h.take() == [] and h.kicks == []
    assert h.state.phase is Phase.CONNECTING
    h.ready(p1, p2)
    done = h.take(m.TopologyDone)
    assert sorted(to for to, _ in done) == [p1, p2]
    assert all(x == m.TopologyDone(e + 1, True) for _, x in done)
    assert not h.state.peers[p3].accepted


def test_ready_while_idle_is_ignored() -> None:
    h = Harness()
    p1, _ = h.admit(2)
    h.ready(p1)
    assert h.take() == [] and h.kicks == []


def test_unreachable_report_evicts_the_unreachable_peer_and_reannounces() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.vote(p1, p2, p3)
    e = h.state.epoch
    h.take()
    h.ready(p1, p3)
    h.state.on_topology_ready(p2, m.TopologyReady(e, False, [p3], "connection refused"))
    assert h.take_kicks() == [(p3, KickCode.UNREACHABLE)]
    assert h.take() == []
    h.drop(p3, "unreachable")  # the daemon reports the kicked connection gone
    assert h.state.epoch == e + 1
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == [p1, p2]
    assert all(t.epoch == e + 1 and ring_ids(t) == [p1, p2] for _, t in topo)
    # Readiness of the superseded epoch does not carry over.
    assert h.take() == []
    h.ready(p1, p2)
    done = h.take()
    assert sorted(to for to, _ in done) == [p1, p2]
    assert all(x == m.TopologyDone(e + 1, True) for _, x in done)


@pytest.mark.parametrize("unreachable", [[], "self", [999]])
def test_failed_report_without_a_culprit_kicks_the_reporter(unreachable: Any) -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    h.vote(p1, p2)
    h.take()
    bad = [p1] if unreachable == "self" else unreachable
    h.state.on_topology_ready(p1, m.TopologyReady(h.state.epoch, False, bad, "no route"))
    assert h.take_kicks() == [(p1, KickCode.P2P_FAILED)]


def test_departure_during_setup_reannounces_without_the_departed() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    p4 = h.join()
    h.vote(p1, p2, p3)
    e = h.state.epoch
    h.take()
    h.ready(p1, p2, p4)
    h.drop(p3)
    assert h.state.epoch == e + 1
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == [p1, p2, p4]
    assert all(ring_ids(t) == [p1, p2, p4] for _, t in topo)
    h.ready()
    assert h.state.phase is Phase.IDLE
    assert h.state.peers[p4].accepted


def test_last_peer_leaving_during_setup_returns_to_idle() -> None:
    h = Harness()
    p1 = h.join()
    assert [to for to, _ in h.take(m.Topology)] == [p1]
    h.drop(p1)
    assert h.take() == []
    assert h.state.phase is Phase.IDLE
    assert h.state.peers == {}
    p2 = h.join()  # the next peer is again admitted at once
    assert [to for to, _ in h.take(m.Topology)] == [p2]


# --------------------------------------------------------------------------- collectives


def test_commence_only_when_every_ring_member_initiated() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.initiate(p1, tag=5)
    h.initiate(p2, tag=5)
    assert h.take() == []
    h.initiate(p3, tag=5)
    go = h.take()
    assert sorted(to for to, _ in go) == [p1, p2, p3]
    op_id = go[0][1].op_id  # type: ignore[attr-defined]
    assert op_id > 0
    # One op id and the current epoch for all; each peer's own attempt number echoed back.
    assert go == [(to, h.commence(to, 5, op_id)) for to, _ in go]
    assert len({x.attempt for _, x in go}) == 3  # type: ignore[attr-defined]
    for p in (p1, p2):
        h.complete(p, 5, op_id)
    assert h.take() == []
    h.complete(p3, 5, op_id)
    done = h.take()
    assert sorted(to for to, _ in done) == [p1, p2, p3]
    assert done == [(to, h.done(to, 5, op_id, True)) for to, _ in done]


def test_concurrent_tags_are_independent_and_op_ids_unique() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1, tag=1)
    h.initiate(p2, tag=2)
    h.initiate(p1, tag=2)
    a = h.take()
    h.initiate(p2, tag=1)
    b = h.take()
    assert sorted(to for to, _ in a) == sorted(to for to, _ in b) == [p1, p2]
    a_id, b_id = a[0][1].op_id, b[0][1].op_id  # type: ignore[attr-defined]
    assert a == [(to, h.commence(to, 2, a_id)) for to, _ in a]
    assert b == [(to, h.commence(to, 1, b_id)) for to, _ in b]
    assert a_id != b_id
    h.complete(p1, 1, b_id, ok=False, reason="boom")  # tag 1 aborts ...
    v = h.take()
    assert {x.tag for _, x in v} == {1} and len(v) == 2  # type: ignore[attr-defined]
    h.complete(p1, 2, a_id)  # ... tag 2 is untouched
    h.complete(p2, 2, a_id)
    done = h.take()
    assert sorted(to for to, _ in done) == [p1, p2]
    assert done == [(to, h.done(to, 2, a_id, True)) for to, _ in done]


@pytest.mark.parametrize("field", ["count", "dtype", "op", "quant"])
def test_mismatched_parameters_give_every_member_a_mismatch_verdict(field: str) -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.initiate(p1, tag=9)
    h.initiate(p2, tag=9)
    h.initiate(p3, tag=9, **{field: PARAMS[field] + 1})
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2, p3]
    for to, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.attempt, v.op_id) == (9, h.attempts[(to, 9)], 0)
        assert (v.ok, v.kind) == (False, AbortKind.MISMATCH)
        assert f"{field}=" in v.reason
    # The tag is free again: a matching retry commences.
    for p in (p1, p2, p3):
        h.initiate(p, tag=9)
    go = h.take()
    assert sorted(to for to, _ in go) == [p1, p2, p3]
    assert all(isinstance(x, m.CollectiveCommence) for _, x in go)


def test_failed_completion_aborts_every_member() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    for p in (p1, p2, p3):
        h.initiate(p, tag=0)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p1, 0, op_id)
    h.complete(p2, 0, op_id, ok=False, reason="progress timeout")
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2, p3]
    for to, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.attempt, v.op_id, v.ok, v.kind) == (
            h.attempts[(to, 0)],
            op_id,
            False,
            AbortKind.ABORTED,
        )
        assert "progress timeout" in v.reason
    # A late report for the aborted operation is ignored.
    h.complete(p3, 0, op_id)
    assert h.take() == [] and h.kicks == []
    assert [tag for _, tag, _ in h.state.aborts[:1]] == [0]


def test_departure_mid_operation_aborts_every_remaining_member() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    for p in (p1, p2, p3):
        h.initiate(p, tag=4)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p1, 4, op_id)
    h.drop(p2, "heartbeat_timeout")
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p3]
    for to, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.attempt, v.op_id, v.ok, v.kind) == (
            4,
            h.attempts[(to, 4)],
            op_id,
            False,
            AbortKind.ABORTED,
        )
        assert str(p2) in v.reason


def test_departure_before_commence_aborts_those_who_initiated() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.initiate(p1, tag=2)
    h.drop(p3)
    sent = h.take()
    assert [to for to, _ in sent] == [p1]
    v = sent[0][1]
    assert isinstance(v, m.CollectiveDone) and not v.ok
    assert (v.attempt, v.op_id, v.kind) == (h.attempts[(p1, 2)], 0, AbortKind.ABORTED)
    # p2 had not initiated; when it does, the broken ring answers at once.
    h.initiate(p2, tag=2)
    ((to, v2),) = h.take()
    assert to == p2 and isinstance(v2, m.CollectiveDone)
    assert (v2.attempt, v2.kind) == (h.attempts[(p2, 2)], AbortKind.STALE_TOPOLOGY)


def test_initiate_on_a_broken_group_is_an_immediate_stale_topology_verdict() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.drop(p3)
    for p in (p1, p2):
        h.initiate(p, tag=7)
        ((to, v),) = h.take()
        assert to == p
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.attempt, v.op_id, v.ok, v.kind) == (
            7,
            h.attempts[(p, 7)],
            0,
            False,
            AbortKind.STALE_TOPOLOGY,
        )
        assert "update_topology" in v.reason
    assert not h.state.peers[p1].ops  # nothing is left outstanding: the peer may vote
    h.vote(p1, p2)
    h.ready()
    h.take()
    h.initiate(p1, tag=7)
    h.initiate(p2, tag=7)
    go = h.take()
    assert len(go) == 2 and all(isinstance(x, m.CollectiveCommence) for _, x in go)


def test_initiate_during_topology_change_is_stale() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    h.vote(p1, p2)
    h.take()
    h.initiate(p1)
    ((to, v),) = h.take()
    assert to == p1 and isinstance(v, m.CollectiveDone)
    assert (v.attempt, v.op_id, v.ok, v.kind) == (
        h.attempts[(p1, 0)],
        0,
        False,
        AbortKind.STALE_TOPOLOGY,
    )
    assert h.kicks == []


def test_duplicate_tag_is_kicked() -> None:
    """A second initiate of a tag still outstanding, without a withdraw, breaks the protocol."""
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1, tag=11)
    h.initiate(p1, tag=11)
    assert h.take_kicks() == [(p1, KickCode.OUT_OF_STATE)]
    h.initiate(p2, tag=11)  # the other peer is unaffected until p1's removal is reported
    assert len(h.take(m.CollectiveCommence)) == 2


def test_initiate_from_pending_peer_is_refused_not_kicked() -> None:
    h = Harness()
    h.admit(2)
    p3 = h.join()
    a = h.initiate(p3, tag=8)
    assert h.take() == [
        (p3, m.CollectiveDone(8, a, 0, False, "not accepted into the run yet", STALE))
    ]
    assert h.kicks == [] and not h.state.peers[p3].ops
    assert not h.state.groups[0].ops  # nothing waits on the pending peer's initiate


def test_foreign_and_stale_completions_are_ignored() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    p3 = h.join()  # pending, same group
    h.initiate(p1, tag=1)
    h.initiate(p2, tag=1)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p3, 1, op_id, ok=False, reason="forged")  # not a member
    h.complete(p1, 1, op_id + 1000, ok=False)  # wrong op id
    h.complete(p1, 99, op_id, ok=False)  # unknown tag
    assert h.take() == [] and h.kicks == []
    h.complete(p1, 1, op_id)
    h.complete(p2, 1, op_id)
    done = h.take()
    assert sorted(to for to, _ in done) == [p1, p2]
    assert done == [(to, h.done(to, 1, op_id, True)) for to, _ in done]


# --------------------------------------------------------------------------- withdraw


def test_withdraw_before_start_frees_the_tag_for_a_retry() -> None:
    """A peer that gave up locally on an initiate not yet started (its start timeout) withdraws
    it; the master confirms, forgets it, and a retry of the same tag is no duplicate."""
    h = Harness()
    p1, p2 = h.admit(2)
    a1 = h.initiate(p1, tag=3)
    h.withdraw(p1, 3, reason="start timeout")
    ((to, v),) = h.take()
    assert to == p1 and isinstance(v, m.CollectiveDone)
    assert (v.tag, v.attempt, v.op_id, v.ok, v.kind) == (3, a1, 0, False, AbortKind.WITHDRAWN)
    assert h.kicks == [] and not h.state.peers[p1].ops
    a2 = h.initiate(p1, tag=3)  # the retry: a new attempt, no "initiated twice"
    assert a2 != a1 and h.take() == [] and h.kicks == []
    h.initiate(p2, tag=3)
    go = h.take()
    op_id = go[0][1].op_id  # type: ignore[attr-defined]
    assert sorted(go) == sorted([(p1, h.commence(p1, 3, op_id)), (p2, h.commence(p2, 3, op_id))])
    assert h.state.groups[0].ops[3].attempts == {p1: a2, p2: h.attempts[(p2, 3)]}


def test_withdraw_before_start_lets_the_topology_vote_succeed() -> None:
    """The withdrawn initiate no longer counts as outstanding: update_topology succeeds."""
    h = Harness()
    p1, p2 = h.admit(2)
    p3 = h.join()
    h.initiate(p1, tag=3)
    h.withdraw(p1, 3)
    h.take()
    e = h.state.epoch
    h.vote(p1, p2)
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == [p1, p2, p3]
    assert h.take(m.TopologyDone) == [] and h.kicks == []  # no refusal
    h.ready()
    done = h.take(m.TopologyDone)
    assert sorted(to for to, _ in done) == [p1, p2, p3]
    assert all(x == m.TopologyDone(e + 1, True) for _, x in done)
    # Nothing of the withdrawn initiate lingers into the new epoch.
    for p in (p1, p2, p3):
        h.initiate(p, tag=3)
    assert len(h.take(m.CollectiveCommence)) == 3


def test_withdraw_of_a_started_operation_aborts_it_for_every_member() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    for p in (p1, p2, p3):
        h.initiate(p, tag=6)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p1, 6, op_id)
    h.withdraw(p2, 6, reason="cancelled by the application")
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2, p3]
    for to, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.attempt, v.op_id, v.ok, v.kind) == (
            6,
            h.attempts[(to, 6)],
            op_id,
            False,
            AbortKind.ABORTED,
        )
        assert f"peer {p2}" in v.reason and "cancelled by the application" in v.reason
    assert h.kicks == [] and not h.state.groups[0].ops
    assert h.query(p1, op_id).state == VerdictState.ABORTED
    h.complete(p3, 6, op_id)  # a late completion changes nothing
    assert h.take() == [] and h.query(p3, op_id).state == VerdictState.ABORTED


def test_withdraw_crossing_its_verdict_is_ignored() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    a1 = h.initiate(p1, tag=2)
    h.initiate(p2, tag=2)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p1, 2, op_id)
    h.complete(p2, 2, op_id)
    assert len(h.take(m.CollectiveDone)) == 2  # the verdict is on its way ...
    h.withdraw(p1, 2, a1, "gave up")  # ... while p1's withdraw crosses it
    assert h.take() == [] and h.kicks == []
    assert h.query(p1, op_id).state == VerdictState.OK  # the verdict stands
    # A withdraw crossing an immediate refusal is ignored too.
    h.drop(p2)
    h.take()
    a2 = h.initiate(p1, tag=2)
    ((_, refusal),) = h.take()
    assert isinstance(refusal, m.CollectiveDone) and refusal.kind == AbortKind.STALE_TOPOLOGY
    h.withdraw(p1, 2, a2)
    assert h.take() == [] and h.kicks == []


def test_withdraw_of_an_older_attempt_leaves_the_current_one() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    a1 = h.initiate(p1, tag=4)
    h.withdraw(p1, 4)
    h.take()
    h.initiate(p1, tag=4)
    h.withdraw(p1, 4, a1)  # a duplicate, late withdraw of the first attempt
    assert h.take() == [] and h.kicks == []
    h.initiate(p2, tag=4)  # the current attempt still counts: the operation starts
    go = h.take()
    op_id = go[0][1].op_id  # type: ignore[attr-defined]
    assert sorted(go) == sorted([(p1, h.commence(p1, 4, op_id)), (p2, h.commence(p2, 4, op_id))])


# --------------------------------------------------------------------------- deadlines


def test_start_deadline_aborts_for_those_who_initiated_naming_the_laggard() -> None:
    h = Harness(Config(start_timeout_s=30.0))
    p1, p2, p3 = h.admit(3)
    h.initiate(p1, tag=12)
    h.initiate(p2, tag=12)
    t0 = time.monotonic()  # not before the first initiate
    h.state.tick(t0 + 15.0)
    assert h.take() == [] and h.kicks == []
    h.state.tick(t0 + 31.0)
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2]  # p3 never initiated: nothing to answer
    for to, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.attempt, v.op_id, v.ok, v.kind) == (
            12,
            h.attempts[(to, 12)],
            0,
            False,
            AbortKind.START_TIMEOUT,
        )
        assert f"[{p3}]" in v.reason and "start_timeout_s=30" in v.reason
    assert h.kicks == [] and p3 in h.state.peers  # nobody is evicted for being slow
    assert not h.state.groups[0].ops
    h.state.tick(t0 + 62.0)  # decided once
    assert h.take() == []
    # A retry by everyone starts normally.
    for p in (p1, p2, p3):
        h.initiate(p, tag=12)
    assert len(h.take(m.CollectiveCommence)) == 3


def test_start_deadline_spares_operations_already_running() -> None:
    h = Harness(Config(start_timeout_s=5.0))
    p1, p2 = h.admit(2)
    h.initiate(p1, tag=1)
    h.initiate(p2, tag=1)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.state.tick(time.monotonic() + 60.0)
    assert h.take() == [] and h.kicks == []
    assert h.query(p1, op_id).state == VerdictState.RUNNING


def test_vote_deadline_tells_the_voters_naming_the_laggard() -> None:
    h = Harness(Config(vote_timeout_s=30.0))
    p1, p2, p3 = h.admit(3)
    e = h.state.epoch
    h.vote(p1, p2)
    t0 = time.monotonic()
    h.state.tick(t0 + 15.0)
    assert h.take() == [] and h.kicks == []
    h.state.tick(t0 + 31.0)
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2]
    for _, v in sent:
        assert isinstance(v, m.TopologyDone)
        assert (v.epoch, v.ok) == (e, False)
        assert f"[{p3}]" in v.reason and "vote_timeout_s=30" in v.reason
    assert h.kicks == [] and sorted(h.state.peers) == [p1, p2, p3]  # nobody evicted
    assert h.state.epoch == e and h.state.phase is Phase.IDLE
    h.state.tick(t0 + 62.0)  # told once
    assert h.take() == []
    # The timed-out votes were reset: p3's late vote alone does not re-wire ...
    h.vote(p3)
    assert h.take() == []
    # ... and a complete retry does.
    h.vote(p1, p2)
    assert sorted(to for to, _ in h.take(m.Topology)) == [p1, p2, p3]


# --------------------------------------------------------------------------- verdicts


def test_verdict_query_reports_ok_aborted_running_and_unknown() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    ok_id = h.run_op([p1, p2], tag=1)
    for p in (p1, p2):
        h.initiate(p, tag=2)
    bad_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p2, 2, bad_id, ok=False, reason="link reset")
    h.take()
    for p in (p1, p2):
        h.initiate(p, tag=3)
    run_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    assert len({ok_id, bad_id, run_id}) == 3
    assert h.query(p1, ok_id) == m.Verdict(ok_id, int(VerdictState.OK), "")
    v = h.query(p2, bad_id)
    assert v.state == VerdictState.ABORTED and "link reset" in v.reason
    assert h.query(p1, run_id).state == VerdictState.RUNNING
    assert h.query(p1, run_id + 1000).state == VerdictState.UNKNOWN
    assert h.query(p2, 1).state == VerdictState.UNKNOWN
    h.complete(p1, 3, run_id)
    h.complete(p2, 3, run_id)
    h.take()
    assert h.query(p2, run_id).state == VerdictState.OK
    # A departure's abort is remembered too.
    for p in (p1, p2):
        h.initiate(p, tag=4)
    gone_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.drop(p2)
    h.take()
    assert h.query(p1, gone_id).state == VerdictState.ABORTED
    assert h.kicks == []


def test_verdict_memory_is_bounded() -> None:
    h = Harness()
    (p1,) = h.admit(1)
    ids = [h.run_op([p1], tag=i % 7) for i in range(VERDICT_MEMORY + 10)]
    assert len(set(ids)) == len(ids)
    assert len(h.state.verdicts) == VERDICT_MEMORY
    for old in ids[:10]:
        assert h.query(p1, old).state == VerdictState.UNKNOWN  # forgotten, oldest first
    for kept in (ids[10], ids[len(ids) // 2], ids[-1]):
        assert h.query(p1, kept).state == VerdictState.OK


# --------------------------------------------------------------------------- ring order


def test_incumbents_keep_their_order_and_newcomers_are_appended_by_id() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    assert h.ring() == [p1, p2, p3]
    # An optimised order the master chose earlier: incumbents must keep it.
    h.state.groups[0].ring = [p3, p1, p2]
    # Newcomers register in the reverse order of their ids: the ring appends them by id.
    p4, p5 = h.state.new_peer_id(), h.state.new_peer_id()
    h.state.register(p5, 0, "10.0.0.5", 40005)
    h.state.register(p4, 0, "10.0.0.4", 40004)
    h.vote(p1, p2, p3)
    topo = h.take(m.Topology)
    assert all(ring_ids(t) == [p3, p1, p2, p4, p5] for _, t in topo)
    h.ready()
    h.drop(p1)
    h.vote(p2, p3, p4, p5)
    topo = h.take(m.Topology)
    assert all(ring_ids(t) == [p3, p2, p4, p5] for _, t in topo)


def test_ring_order_is_deterministic() -> None:
    def run() -> list[tuple[int, m.Message]]:
        h = Harness()
        base = h.state.epoch  # epochs start from a wall-clock base: compare them relative to it
        a, b, c = h.admit(3)
        h.join()
        h.join(1)
        h.join()
        h.drop(b)
        h.vote(a, c)
        h.ready()
        return [
            (p, dataclasses.replace(x, epoch=x.epoch - base) if hasattr(x, "epoch") else x)
            for p, x in h.sent
        ]

    first = run()
    assert first == run()
    topo = [x for _, x in first if isinstance(x, m.Topology)]
    assert topo and all(ring_ids(t) == sorted(ring_ids(t)) for t in topo)


def test_topology_carries_addresses_and_sizes() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    p3 = h.join(group=7)
    h.vote(p1, p2)
    topo = dict(h.take(m.Topology))
    assert topo[p1] == topo[p2]
    t0, t7 = topo[p1], topo[p3]
    assert isinstance(t0, m.Topology) and isinstance(t7, m.Topology)
    assert t0.ring == [(p1, "10.0.0.1", 40001), (p2, "10.0.0.2", 40002)]
    assert t7.ring == [(p3, "10.0.0.3", 40003)]
    assert (t0.world_size, t0.group_world_size, t0.num_groups) == (3, 2, 2)
    assert (t7.world_size, t7.group_world_size, t7.num_groups) == (3, 1, 2)


# --------------------------------------------------------------------------- groups


def test_groups_are_isolated() -> None:
    h = Harness()
    a1, a2 = h.admit(2, group=0)
    b1, b2 = h.admit(2, group=1)
    assert h.ring(0) == [a1, a2] and h.ring(1) == [b1, b2]
    # Same tag in both groups: two separate operations.
    for p in (a1, a2, b1):
        h.initiate(p, tag=0)
    go_a = h.take()
    assert sorted(to for to, _ in go_a) == [a1, a2]
    op_id = go_a[0][1].op_id  # type: ignore[attr-defined]
    assert go_a == [(to, h.commence(to, 0, op_id)) for to, _ in go_a]
    # A departure in group 1 aborts group 1's operation only.
    h.drop(b2)
    sent = h.take()
    assert [to for to, _ in sent] == [b1]
    assert isinstance(sent[0][1], m.CollectiveDone) and not sent[0][1].ok
    assert not h.state.groups[0].broken and h.state.groups[1].broken
    h.complete(a1, 0, op_id)
    h.complete(a2, 0, op_id)
    done = h.take()
    assert sorted(to for to, _ in done) == [a1, a2]
    assert done == [(to, h.done(to, 0, op_id, True)) for to, _ in done]
    # Group 0 keeps running; group 1 is stale until the next topology update.
    h.initiate(a1, tag=3)
    h.initiate(a2, tag=3)
    assert len(h.take(m.CollectiveCommence)) == 2
    h.initiate(b1, tag=3)
    ((to, v),) = h.take()
    assert to == b1 and isinstance(v, m.CollectiveDone) and v.kind == AbortKind.STALE_TOPOLOGY


def test_departure_in_one_group_during_setup_keeps_other_groups_rings() -> None:
    h = Harness()
    a1, a2 = h.admit(2, group=0)
    b1, b2 = h.admit(2, group=1)
    h.vote(a1, a2, b1, b2)
    first = dict(h.take(m.Topology))
    e0 = first[a1].epoch  # type: ignore[attr-defined]
    h.drop(b2)
    # Epochs are per group: group 1 re-announces without b2; group 0's set-up goes on as it
    # was (no second announcement), and completes with the epoch it was given.
    topo = dict(h.take(m.Topology))
    assert sorted(topo) == [b1] and ring_ids(topo[b1]) == [b1]  # type: ignore[arg-type]
    assert topo[b1].epoch > e0  # type: ignore[attr-defined]
    h.ready()
    assert h.state.phase is Phase.IDLE
    assert h.state.groups[0].epoch == e0 and h.ring(0) == [a1, a2]


def test_a_group_votes_alone() -> None:
    """A group admits its newcomers with its own members' votes: other groups neither vote
    nor see a new epoch, and their collectives keep running through it."""
    h = Harness()
    a1, a2 = h.admit(2, group=0)
    b1, b2 = h.admit(2, group=1)
    e0 = h.state.groups[0].epoch
    h.initiate(a1, tag=5)
    b3 = h.join(group=1)
    h.vote(b1, b2)
    topo = dict(h.take(m.Topology))
    assert sorted(topo) == [b1, b2, b3] and ring_ids(topo[b3]) == [b1, b2, b3]  # type: ignore[arg-type]
    assert h.state.groups[0].phase is Phase.IDLE and h.state.groups[1].phase is Phase.CONNECTING
    h.initiate(a2, tag=5)  # group 0's operation starts while group 1 wires
    go = h.take(m.CollectiveCommence)
    assert sorted(to for to, _ in go) == [a1, a2]
    assert all(c.epoch == e0 for _, c in go)  # type: ignore[attr-defined]
    h.ready(b1, b2, b3)
    done = h.take(m.TopologyDone)
    assert sorted(to for to, _ in done) == [b1, b2, b3] and all(d.ok for _, d in done)  # type: ignore[attr-defined]
    assert h.state.groups[0].epoch == e0 and h.state.peers[b3].accepted


# --------------------------------------------------------------------------- wire bounds


def test_mismatch_verdict_among_many_peers_fits_the_wire() -> None:
    """The mismatch verdict lists every peer's parameters; with 16 peers that exceeds the
    512-character bound of ``CollectiveDone.reason`` and no peer could decode the verdict."""
    h = Harness()
    pids = h.admit(16)
    for i, p in enumerate(pids):
        h.initiate(p, tag=0, count=1000 + i)  # every peer disagrees
    sent = h.take()
    assert sorted(to for to, _ in sent) == sorted(pids)
    assert all(isinstance(v, m.CollectiveDone) and v.kind == AbortKind.MISMATCH for _, v in sent)


def test_abort_verdict_quoting_a_maximal_peer_reason_fits_the_wire() -> None:
    """A peer may report a failure reason of up to 512 characters; the verdict that quotes it
    to the whole group must still decode."""
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1)
    h.initiate(p2)
    op_id = h.take()[0][1].op_id  # type: ignore[attr-defined]
    h.complete(p1, 0, op_id, ok=False, reason="r" * 512)
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2]
    assert all(isinstance(v, m.CollectiveDone) and not v.ok for _, v in sent)


@pytest.mark.parametrize("started", [False, True], ids=["pending", "running"])
def test_withdraw_with_a_maximal_reason_gets_a_decodable_answer(started: bool) -> None:
    """A withdraw may carry a 512-character reason; what the master answers (a confirmation,
    or the abort that quotes it to the whole group) must still decode."""
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1)
    if started:
        h.initiate(p2)
        h.take()
    h.withdraw(p1, 0, reason="w" * 512)
    sent = h.take()
    assert sorted(to for to, _ in sent) == ([p1, p2] if started else [p1])
    kind = AbortKind.ABORTED if started else AbortKind.WITHDRAWN
    assert all(isinstance(v, m.CollectiveDone) and v.kind == kind for _, v in sent)


def test_registrations_beyond_max_peers_never_produce_an_undecodable_topology() -> None:
    """Registration is unauthenticated and unbounded; ``Topology.world_size`` is bounded by
    ``MAX_PEERS``. The master must refuse (kick) peers beyond the bound rather than announce a
    topology that every peer rejects as a protocol error (disconnecting the whole run)."""
    h = Harness()
    (first,) = h.admit(1)
    groups = m.MAX_PEERS // m.MAX_GROUP_PEERS * 2  # the world bound is reached first
    for i in range(m.MAX_PEERS + 8):
        seen = len(h.kicks)
        pid = h.join(group=i % groups)
        if len(h.kicks) > seen:
            assert h.kicks[-1][:2] == (pid, KickCode.FULL)
            h.drop(pid, "kicked")
    assert len(h.state.peers) == m.MAX_PEERS
    h.vote(first)
    topo = h.take(m.Topology)
    assert topo, "no topology announced"
    assert all(t.world_size <= m.MAX_PEERS for _, t in topo)  # type: ignore[attr-defined]
    assert all(t.group_world_size <= m.MAX_GROUP_PEERS for _, t in topo)  # type: ignore[attr-defined]
    for _, t in topo:
        t.encode()  # within every wire bound


def test_a_full_group_refuses_newcomers_but_other_groups_take_them() -> None:
    """A ring is bounded by ``MAX_GROUP_PEERS`` on the wire: the master refuses a newcomer to
    a full group (``FULL``, naming the group) while other groups still take peers."""
    h = Harness()
    h.state.groups[3] = state_mod.GroupState(members=set(range(10**6, 10**6 + m.MAX_GROUP_PEERS)))
    pid = h.join(group=3)
    assert [(p, c) for p, c, _ in h.kicks] == [(pid, KickCode.FULL)]
    assert f"peer group 3 already has {m.MAX_GROUP_PEERS} peers" in h.kicks[0][2]
    h.take_kicks()
    assert pid not in h.state.peers
    other = h.join(group=4)
    assert h.take_kicks() == [] and other in h.state.groups[4].members


# --------------------------------------------------------------------------- peer ids


@pytest.mark.parametrize("resume", [m.MAX_PEER_ID + 1, 2**63, 2**64 - 1])
def test_resume_above_max_peer_id_is_refused_at_decode(resume: int) -> None:
    fields = msgpack.unpackb(m.Hello(PROTOCOL_VERSION, 0, 4242, "", 7).encode()[HEADER.size :])
    assert fields[4] == 7
    m.decode(MsgType.P2M_HELLO, msgpack.packb(fields))  # the well-formed one decodes
    fields[4] = resume
    with pytest.raises(ProtocolError, match="resume_peer_id"):
        m.decode(MsgType.P2M_HELLO, msgpack.packb(fields))
    fields[4] = m.MAX_PEER_ID  # the largest id is still a valid resume
    assert m.decode(MsgType.P2M_HELLO, msgpack.packb(fields)).resume_peer_id == m.MAX_PEER_ID  # type: ignore[attr-defined]


def test_resume_of_the_largest_id_does_not_exhaust_ids() -> None:
    """Without a store a resume is granted as asked; one asking for ``MAX_PEER_ID`` (a stranger
    can, when no token is set) must not leave every later newcomer without an id."""
    h = Harness()
    (p1,) = h.admit(1)
    top = h.state.new_peer_id(m.MAX_PEER_ID)
    assert top == m.MAX_PEER_ID
    h.state.register(top, 0, "10.0.0.99", 40099, resumed=True)
    newcomers = []
    for i in range(3):
        pid = h.state.new_peer_id()
        h.state.register(pid, 0, f"10.0.1.{i}", 41000 + i)
        newcomers.append(pid)
    assert h.kicks == []
    assert all(0 < p <= m.MAX_PEER_ID for p in newcomers)
    assert len({p1, top, *newcomers}) == 5
    h.vote(p1)
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == sorted([p1, top, *newcomers])
    h.ready()
    assert all(h.state.peers[p].accepted for p in newcomers)


def test_resume_of_an_id_in_use_gets_a_fresh_id() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    other = h.state.new_peer_id(p2)
    assert other not in (0, p1, p2)


# --------------------------------------------------------------------------- restart safety


def test_ids_issued_before_a_restart_are_never_reissued(tmp_path: Path) -> None:
    path = tmp_path / "master-state.json"
    h = Harness(store=RunStore(path), restart_grace_s=0.0)
    issued = set(h.admit(3))
    gone = h.join()  # registered, then left: its id was issued all the same
    h.drop(gone)
    issued.add(gone)
    for restart in range(3):  # each a new master over the same file, the previous one killed
        h = Harness(store=RunStore(path), restart_grace_s=0.0)
        # More ids than one reserved block, so the floor must move while this master runs.
        fresh = [h.state.new_peer_id() for _ in range(300 if restart == 1 else 5)]
        assert 0 not in fresh and len(set(fresh)) == len(fresh)
        assert not issued & set(fresh), f"restart {restart} reissued {sorted(issued & set(fresh))}"
        issued |= set(fresh)
    # A returning incumbent keeps its id; the ids are not handed to anyone else meanwhile.
    h = Harness(store=RunStore(path), restart_grace_s=0.0)
    assert h.state.new_peer_id(gone) == gone
    assert h.state.new_peer_id() not in issued


def test_resume_with_an_id_never_issued_gets_a_fresh_id(tmp_path: Path) -> None:
    path = tmp_path / "master-state.json"
    h = Harness(store=RunStore(path), restart_grace_s=0.0)
    p1, p2 = h.admit(2)
    # Within one run: an id this master has not issued yet is not granted to a resume.
    wanted = p2 + 50
    got = h.state.new_peer_id(wanted)
    assert got not in (0, wanted, p1, p2)
    assert h.state.new_peer_id() not in (wanted, got)
    issued = {p1, p2, got}
    # After a restart: ids beyond everything ever reserved are not granted either.
    h = Harness(store=RunStore(path), restart_grace_s=0.0)
    for wanted in (10**6, m.MAX_PEER_ID):
        fresh = h.state.new_peer_id(wanted)
        assert fresh not in (0, wanted) and fresh not in issued
        issued.add(fresh)
    assert h.state.new_peer_id(p1) == p1  # an id it did issue is granted back


def _previous_run(path: Path, n: int) -> list[int]:
    """A master over ``path`` that formed a run of ``n`` peers, then was killed."""
    h = Harness(store=RunStore(path), restart_grace_s=0.0)
    pids = h.admit(n)
    h.state.tick(time.monotonic())  # the daemon's periodic tick persists the membership
    return pids


def test_restart_newcomer_waits_for_the_incumbents_then_all_form_one_run(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "master-state.json"
    p1, p2 = _previous_run(path, 2)
    h = Harness(Config(reconnect_timeout_s=30.0), store=RunStore(path), restart_grace_s=2.0)
    newcomer = h.join()
    assert newcomer not in (p1, p2)
    h.state.tick(clock.advance(1.0))
    h.state.tick(clock.advance(20.0))
    assert h.take() == [] and h.state.phase is Phase.IDLE  # no run of its own
    # What the daemon's Welcome says: newcomers wait, the previous run's peers do not.
    assert not h.state.admits_at_once(newcomer + 1)
    assert h.state.admits_at_once(p1)
    assert not h.state.peers[newcomer].accepted
    assert h.state.new_peer_id(p1) == p1
    h.state.register(p1, 0, "10.0.0.1", 40001, resumed=True)
    h.state.tick(clock.advance(1.0))
    assert h.take() == []  # the restart grace: waits for the rest of the previous run
    assert h.state.new_peer_id(p2) == p2
    h.state.register(p2, 0, "10.0.0.2", 40002, resumed=True)
    h.state.tick(clock.advance(1.5))
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == sorted([p1, p2, newcomer])
    assert all(ring_ids(t) == [p1, p2, newcomer] for _, t in topo)  # type: ignore[arg-type]
    h.ready()
    done = h.take(m.TopologyDone)
    assert sorted(to for to, _ in done) == sorted([p1, p2, newcomer])
    assert all(x.ok for _, x in done)  # type: ignore[attr-defined]
    assert h.kicks == []


def test_restart_newcomers_form_a_run_alone_after_the_orphan_deadline(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "master-state.json"
    p1, _ = _previous_run(path, 2)
    h = Harness(Config(reconnect_timeout_s=20.0), store=RunStore(path), restart_grace_s=1.0)
    n1 = h.join()
    n2 = h.join()
    h.state.tick(clock.advance(20.5))  # within reconnect_timeout_s + restart_grace_s
    assert h.take() == []
    assert not h.state.admits_at_once(n2 + 1)
    h.state.tick(clock.advance(1.0))  # past it: the previous run is not coming back
    topo = h.take(m.Topology)
    assert sorted(to for to, _ in topo) == [n1, n2]
    assert all(ring_ids(t) == [n1, n2] for _, t in topo)  # type: ignore[arg-type]
    h.ready()
    assert len(h.take(m.TopologyDone)) == 2
    # An incumbent returning late keeps its id and joins the new run by its vote.
    assert h.state.new_peer_id(p1) == p1
    h.state.register(p1, 0, "10.0.0.1", 40001, resumed=True)
    assert h.take() == [] and not h.state.peers[p1].accepted
    h.vote(n1, n2)
    assert sorted(to for to, _ in h.take(m.Topology)) == sorted([n1, n2, p1])
    assert h.kicks == []


def test_restart_without_a_previous_run_admits_the_first_peer_at_once(tmp_path: Path) -> None:
    path = tmp_path / "master-state.json"
    Harness(store=RunStore(path), restart_grace_s=0.0).state.new_peer_id()  # no run formed
    h = Harness(store=RunStore(path), restart_grace_s=0.0)
    p = h.join()
    assert [to for to, _ in h.take(m.Topology)] == [p]


# ---------------------------------------------------------------- verdicts across a restart


def _restarted(grace: float = 0.0) -> tuple[Harness, list[int], int]:
    """A master that restarted (its op ids start after ``old``) with three resumed peers."""
    h = Harness(restart_grace_s=grace)
    pids = []
    for _ in range(3):
        pid = h.state.new_peer_id()
        h.state.register(pid, 0, f"10.0.0.{pid}", 40000 + pid, resumed=True)
        pids.append(pid)
    old = h.state._first_op_id - 7  # an operation the previous incarnation ran
    return h, pids, old


def _query(h: Harness, pid: int, op_id: int, members: list[int]) -> m.Verdict:
    h.state.on_verdict_query(pid, m.VerdictQuery(op_id, members))
    ((to, v),) = h.take(m.Verdict)
    assert to == pid and isinstance(v, m.Verdict)
    return v


def test_restart_rebuilds_an_ok_verdict_from_a_peer_that_kept_the_result() -> None:
    h, (a, b, c), old = _restarted(grace=60.0)
    h.state.on_outcomes(a, m.Outcomes([(old, int(Outcome.KEPT))]))
    assert _query(h, b, old, [a, b, c]).state == VerdictState.OK  # no grace needed: proven


def test_restart_rebuilds_an_abort_from_a_peer_that_restored() -> None:
    h, (a, b, c), old = _restarted(grace=60.0)
    h.state.on_outcomes(c, m.Outcomes([(old, int(Outcome.RESTORED))]))
    v = _query(h, a, old, [a, b, c])
    assert v.state == VerdictState.ABORTED and f"peer {c}" in v.reason


def test_restart_in_doubt_is_ok_once_every_returning_member_reported() -> None:
    h, (a, b, c), old = _restarted(grace=0.0)
    gone = 99  # a member that never came back: its bytes no longer matter
    h.state.on_outcomes(a, m.Outcomes([(old, int(Outcome.IN_DOUBT))]))
    assert _query(h, a, old, [a, b, c, gone]).state == VerdictState.RUNNING  # b, c unheard
    h.state.on_outcomes(b, m.Outcomes([(old, int(Outcome.IN_DOUBT))]))
    assert _query(h, b, old, [a, b, c, gone]).state == VerdictState.RUNNING
    h.state.on_outcomes(c, m.Outcomes([]))  # c reported, with no objection
    assert _query(h, a, old, [a, b, c, gone]).state == VerdictState.OK
    assert _query(h, b, old, [a, b, c, gone]).state == VerdictState.OK


def test_restart_in_doubt_waits_for_the_grace_period() -> None:
    h, (a, b, c), old = _restarted(grace=5.0)
    for p in (a, b, c):
        h.state.on_outcomes(p, m.Outcomes([(old, int(Outcome.IN_DOUBT))]))
    assert _query(h, a, old, [a, b, c]).state == VerdictState.RUNNING
    h.state.tick(h.state._started + 6.0)  # past the grace: decided by the tick
    assert _query(h, a, old, [a, b, c]).state == VerdictState.OK


def test_outcomes_never_override_a_verdict_of_this_incarnation() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    op = h.run_op([p1, p2], tag=1)
    h.state.on_outcomes(p1, m.Outcomes([(op, int(Outcome.RESTORED))]))
    assert h.query(p2, op).state == VerdictState.OK
    # A query without members for an unknown old op cannot be resolved: UNKNOWN, not RUNNING.
    assert h.query(p1, 5).state == VerdictState.UNKNOWN


def test_a_vote_from_a_peer_whose_plan_is_pending_is_refused_not_kicked() -> None:
    """A peer that gave up before its plan arrived and votes again (untimely, not hostile)
    gets a retryable refusal; the running round still completes for the others."""
    h = Harness()
    a, b = h.admit(2)
    entry = [("w", 0, 4, [1], b"\x01" * 16, False)]
    stale = [("w", 0, 4, [1], b"\x02" * 16, False)]
    h.state.on_sync_vote(a, m.SyncSharedState(0, 0, entry))
    h.state.on_sync_vote(b, m.SyncSharedState(0, 0, stale))
    plans = dict(h.take(m.SyncPlan))
    assert plans[a].ok and plans[b].ok  # type: ignore[attr-defined]
    h.state.on_sync_vote(a, m.SyncSharedState(0, 0, entry))  # a retried before its plan came
    ((to, refusal),) = h.take(m.SyncPlan)
    assert to == a and isinstance(refusal, m.SyncPlan) and not refusal.ok
    assert "retry" in refusal.reason and h.kicks == []
    sync_id = plans[b].sync_id  # type: ignore[attr-defined]
    h.state.on_sync_done(b, m.SyncDone(sync_id, True))
    done = h.take(m.SyncComplete)
    assert {to for to, _ in done} == {a, b}  # a stays a member: it serves until the end
    assert h.state.groups[0].sync is None


def test_parity_violations_are_votes_at_the_elected_revision_with_other_content() -> None:
    """Three incumbents vote revision 4; one holds different bytes: one violation, naming the
    entry. A newcomer behind (revision 0) fetching everything is not a violation."""
    h = Harness()
    a, b, c = h.admit(3)
    good = [("w", 0, 4, [1], b"\x01" * 16, False), ("m", 0, 4, [1], b"\x03" * 16, False)]
    bad = [("w", 0, 4, [1], b"\x02" * 16, False), ("m", 0, 4, [1], b"\x03" * 16, False)]

    def sync(votes: dict[int, tuple[int, list[Any]]]) -> None:
        for pid, (rev, ents) in votes.items():
            h.state.on_sync_vote(pid, m.SyncSharedState(rev, 0, ents))
        plans = dict(h.take(m.SyncPlan))
        for pid, plan in plans.items():
            h.state.on_sync_done(pid, m.SyncDone(plan.sync_id, True))  # type: ignore[attr-defined]
        h.take()

    sync({a: (3, good), b: (3, good), c: (3, good)})
    assert h.state.parity_violations_total == 0 and h.state.syncs_judged == 1
    sync({a: (4, good), b: (4, bad), c: (4, good)})
    assert h.state.parity_violations_total == 1
    (_, group, _, rev, peer, keys) = h.state.parity_violations[-1]
    assert (group, rev, peer, keys) == (0, 4, b, ["w"])
    d = h.join()
    h.vote(a, b, c)
    h.ready()
    h.take()
    sync({a: (5, good), b: (5, good), c: (5, good), d: (0, bad)})  # d is behind: it fetches
    assert h.state.parity_violations_total == 1 and h.state.syncs_judged == 3
