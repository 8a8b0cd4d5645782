"""``pccl.master.state.MasterState`` without sockets.

The state machine talks only through its two callbacks; here they append to lists, so each test
drives a scenario event by event and asserts exactly which message reached which peer. Covers
admission (first peer at once, newcomers by unanimous vote, departed voters completing votes),
epoch set-up (ready/done, unreachable reports), collective votes and verdicts, ring order, and
the isolation of peer groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pccl.master.state import MasterState, Phase

from pccl import messages as m
from pccl.errors import ProtocolError
from pccl.frame import HEADER

pytestmark = pytest.mark.timeout(30)

PARAMS = dict(count=1024, dtype=0, op=0, quant=0)


class Harness:
    """A MasterState wired to lists. ``kick`` only records, like a daemon whose connection has
    not closed yet; :meth:`drop` then simulates the disconnect the daemon reports later."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, m.Message]] = []
        self.kicks: list[tuple[int, str, str]] = []
        self._checked: dict[int, m.Message] = {}
        self.state = MasterState(self._send, self._kick)

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

    def _kick(self, pid: int, code: str, reason: str) -> None:
        self.kicks.append((pid, code, reason))

    # -------------------------------------------------------------- driving

    def join(self, group: int = 0) -> int:
        pid = self.state.new_peer_id()
        self.state.register(pid, group, f"10.0.0.{pid}", 40000 + pid)
        return pid

    def ready(self, *pids: int, epoch: int | None = None) -> None:
        e = self.state.epoch if epoch is None else epoch
        for pid in pids or self.in_epoch():
            self.state.on_topology_ready(pid, m.TopologyReady(e, True))

    def in_epoch(self) -> list[int]:
        return [p.peer_id for p in self.state.peers.values() if p.in_epoch]

    def vote(self, *pids: int) -> None:
        for pid in pids:
            self.state.on_update_topology(pid)

    def drop(self, pid: int, reason: str = "disconnected") -> None:
        self.state.remove(pid, reason)

    def initiate(self, pid: int, tag: int = 0, **kw: Any) -> None:
        self.state.on_initiate(pid, m.CollectiveInitiate(tag, **{**PARAMS, **kw}))

    def complete(self, pid: int, tag: int, op_id: int, ok: bool = True, reason: str = "") -> None:
        self.state.on_complete(pid, m.CollectiveComplete(tag, op_id, ok, reason))

    def admit(self, n: int, group: int = 0) -> list[int]:
        """Bring ``n`` new peers of ``group`` into the run (votes from everyone accepted)."""
        pids = []
        for _ in range(n):
            pid = self.join(group)
            pids.append(pid)
            if self.state.phase is Phase.CONNECTING:
                self.ready()
            else:
                self.vote(*[p.peer_id for p in self.state.accepted])
                self.ready()
        assert all(self.state.peers[p].accepted for p in pids)
        self.take()
        return pids

    # -------------------------------------------------------------- inspecting

    def take(self, kind: type[m.Message] | None = None) -> list[tuple[int, m.Message]]:
        """Remove and return what was sent (of ``kind``), in order."""
        out = [(p, x) for p, x in self.sent if kind is None or isinstance(x, kind)]
        self.sent = [(p, x) for p, x in self.sent if not (kind is None or isinstance(x, kind))]
        return out

    def take_kicks(self) -> list[tuple[int, str]]:
        out = [(p, c) for p, c, _ in self.kicks]
        self.kicks.clear()
        return out

    def ring(self, group: int = 0) -> list[int]:
        return list(self.state.groups[group].ring)


def ring_ids(t: m.Topology) -> list[int]:
    return [pid for pid, _, _ in t.ring]


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


def test_update_vote_out_of_state_is_kicked() -> None:
    h = Harness()
    p1 = h.join()
    h.vote(p1)  # not accepted yet (still connecting)
    assert h.take_kicks() == [(p1, "out_of_state")]
    h.ready(p1)
    p2 = h.join()
    h.vote(p2)  # pending peers do not vote
    assert h.take_kicks() == [(p2, "out_of_state")]


def test_update_vote_with_collective_outstanding_is_kicked() -> None:
    h = Harness()
    p1, _ = h.admit(2)
    h.initiate(p1, tag=3)
    h.vote(p1)
    assert h.take_kicks() == [(p1, "out_of_state")]


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
    h.ready(p3)
    assert h.take_kicks() == [(p3, "out_of_state")]
    h.ready(p1, p2)
    assert len(h.take(m.TopologyDone)) == 2


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
    assert h.take_kicks() == [(p3, "unreachable")]
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
    assert h.take_kicks() == [(p1, "p2p_failed")]


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
    (msg,) = {x for _, x in go}
    assert isinstance(msg, m.CollectiveCommence)
    assert (msg.tag, msg.epoch) == (5, h.state.epoch) and msg.op_id > 0
    for p in (p1, p2):
        h.complete(p, 5, msg.op_id)
    assert h.take() == []
    h.complete(p3, 5, msg.op_id)
    done = h.take()
    assert sorted(to for to, _ in done) == [p1, p2, p3]
    assert {x for _, x in done} == {m.CollectiveDone(5, msg.op_id, True, "", "")}


def test_concurrent_tags_are_independent_and_op_ids_unique() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1, tag=1)
    h.initiate(p2, tag=2)
    h.initiate(p1, tag=2)
    (a,) = {x for _, x in h.take()}
    h.initiate(p2, tag=1)
    (b,) = {x for _, x in h.take()}
    assert isinstance(a, m.CollectiveCommence) and isinstance(b, m.CollectiveCommence)
    assert (a.tag, b.tag) == (2, 1)
    assert a.op_id != b.op_id
    h.complete(p1, 1, b.op_id, ok=False, reason="boom")  # tag 1 aborts ...
    v = h.take()
    assert {x.tag for _, x in v} == {1} and len(v) == 2
    h.complete(p1, 2, a.op_id)  # ... tag 2 is untouched
    h.complete(p2, 2, a.op_id)
    assert {x for _, x in h.take()} == {m.CollectiveDone(2, a.op_id, True, "", "")}


@pytest.mark.parametrize("field", ["count", "dtype", "op", "quant"])
def test_mismatched_parameters_give_every_member_a_mismatch_verdict(field: str) -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.initiate(p1, tag=9)
    h.initiate(p2, tag=9)
    h.initiate(p3, tag=9, **{field: PARAMS[field] + 1})
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2, p3]
    for _, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.ok, v.kind) == (9, False, "mismatch")
        assert f"{field}=" in v.reason
    # The tag is free again: a matching retry commences.
    for p in (p1, p2, p3):
        h.initiate(p, tag=9)
    assert all(isinstance(x, m.CollectiveCommence) for _, x in h.take())


def test_failed_completion_aborts_every_member() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    for p in (p1, p2, p3):
        h.initiate(p, tag=0)
    (go,) = {x for _, x in h.take()}
    h.complete(p1, 0, go.op_id)
    h.complete(p2, 0, go.op_id, ok=False, reason="progress timeout")
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2, p3]
    for _, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.op_id, v.ok, v.kind) == (go.op_id, False, "aborted")
        assert "progress timeout" in v.reason
    # A late report for the aborted operation is ignored.
    h.complete(p3, 0, go.op_id)
    assert h.take() == [] and h.kicks == []
    assert [tag for _, tag, _ in h.state.aborts[:1]] == [0]


def test_departure_mid_operation_aborts_every_remaining_member() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    for p in (p1, p2, p3):
        h.initiate(p, tag=4)
    (go,) = {x for _, x in h.take()}
    h.complete(p1, 4, go.op_id)
    h.drop(p2, "heartbeat_timeout")
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p3]
    for _, v in sent:
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.op_id, v.ok, v.kind) == (4, go.op_id, False, "aborted")
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
    # p2 had not initiated; when it does, the broken ring answers at once.
    h.initiate(p2, tag=2)
    ((to, v2),) = h.take()
    assert to == p2 and isinstance(v2, m.CollectiveDone) and v2.kind == "stale_topology"


def test_initiate_on_a_broken_group_is_an_immediate_stale_topology_verdict() -> None:
    h = Harness()
    p1, p2, p3 = h.admit(3)
    h.drop(p3)
    for p in (p1, p2):
        h.initiate(p, tag=7)
        ((to, v),) = h.take()
        assert to == p
        assert isinstance(v, m.CollectiveDone)
        assert (v.tag, v.op_id, v.ok, v.kind) == (7, 0, False, "stale_topology")
        assert "update_topology" in v.reason
    assert not h.state.peers[p1].ops  # nothing is left outstanding: the peer may vote
    h.vote(p1, p2)
    h.ready()
    h.take()
    h.initiate(p1, tag=7)
    h.initiate(p2, tag=7)
    assert all(isinstance(x, m.CollectiveCommence) for _, x in h.take())


def test_initiate_during_topology_change_is_stale() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    h.vote(p1, p2)
    h.take()
    h.initiate(p1)
    ((_, v),) = h.take()
    assert isinstance(v, m.CollectiveDone) and v.kind == "stale_topology"


def test_duplicate_tag_is_kicked() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1, tag=11)
    h.initiate(p1, tag=11)
    assert h.take_kicks() == [(p1, "out_of_state")]
    h.initiate(p2, tag=11)  # the other peer is unaffected until p1's removal is reported
    assert len(h.take(m.CollectiveCommence)) == 2


def test_initiate_from_pending_peer_is_kicked() -> None:
    h = Harness()
    h.admit(2)
    p3 = h.join()
    h.initiate(p3)
    assert h.take_kicks() == [(p3, "out_of_state")]
    assert h.take() == []


def test_foreign_and_stale_completions_are_ignored() -> None:
    h = Harness()
    p1, p2 = h.admit(2)
    p3 = h.join()  # pending, same group
    h.initiate(p1, tag=1)
    h.initiate(p2, tag=1)
    (go,) = {x for _, x in h.take()}
    h.complete(p3, 1, go.op_id, ok=False, reason="forged")  # not a member
    h.complete(p1, 1, go.op_id + 1000, ok=False)  # wrong op id
    h.complete(p1, 99, go.op_id, ok=False)  # unknown tag
    assert h.take() == [] and h.kicks == []
    h.complete(p1, 1, go.op_id)
    h.complete(p2, 1, go.op_id)
    assert {x for _, x in h.take()} == {m.CollectiveDone(1, go.op_id, True, "", "")}


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
    (go,) = {x for _, x in go_a}
    # A departure in group 1 aborts group 1's operation only.
    h.drop(b2)
    sent = h.take()
    assert [to for to, _ in sent] == [b1]
    assert isinstance(sent[0][1], m.CollectiveDone) and not sent[0][1].ok
    assert not h.state.groups[0].broken and h.state.groups[1].broken
    h.complete(a1, 0, go.op_id)
    h.complete(a2, 0, go.op_id)
    assert {x for _, x in h.take()} == {m.CollectiveDone(0, go.op_id, True, "", "")}
    # Group 0 keeps running; group 1 is stale until the next topology update.
    h.initiate(a1, tag=3)
    h.initiate(a2, tag=3)
    assert len(h.take(m.CollectiveCommence)) == 2
    h.initiate(b1, tag=3)
    ((to, v),) = h.take()
    assert to == b1 and isinstance(v, m.CollectiveDone) and v.kind == "stale_topology"


def test_departure_in_one_group_during_setup_keeps_other_groups_rings() -> None:
    h = Harness()
    a1, a2 = h.admit(2, group=0)
    b1, b2 = h.admit(2, group=1)
    h.vote(a1, a2, b1, b2)
    h.take()
    h.drop(b2)
    topo = dict(h.take(m.Topology))
    assert ring_ids(topo[a1]) == [a1, a2]  # type: ignore[arg-type]
    assert ring_ids(topo[b1]) == [b1]  # type: ignore[arg-type]
    h.ready()
    assert h.state.phase is Phase.IDLE


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
    assert all(isinstance(v, m.CollectiveDone) and v.kind == "mismatch" for _, v in sent)


def test_abort_verdict_quoting_a_maximal_peer_reason_fits_the_wire() -> None:
    """A peer may report a failure reason of up to 512 characters; the verdict that quotes it
    to the whole group must still decode."""
    h = Harness()
    p1, p2 = h.admit(2)
    h.initiate(p1)
    h.initiate(p2)
    (go,) = {x for _, x in h.take()}
    h.complete(p1, 0, go.op_id, ok=False, reason="r" * 512)
    sent = h.take()
    assert sorted(to for to, _ in sent) == [p1, p2]
    assert all(isinstance(v, m.CollectiveDone) and not v.ok for _, v in sent)


def test_registrations_beyond_max_peers_never_produce_an_undecodable_topology() -> None:
    """Registration is unauthenticated and unbounded; ``Topology.world_size`` is bounded by
    ``MAX_PEERS``. The master must refuse (kick) peers beyond the bound rather than announce a
    topology that every peer rejects as a protocol error (disconnecting the whole run)."""
    h = Harness()
    (first,) = h.admit(1)
    for i in range(m.MAX_PEERS):
        pid = h.join(group=i % 2)
        if pid in {p for p, _, _ in h.kicks}:
            h.drop(pid, "kicked")
    h.vote(first)
    topo = h.take(m.Topology)
    assert topo, "no topology announced"
    assert all(t.world_size <= m.MAX_PEERS for _, t in topo)  # type: ignore[attr-defined]
